//! Connections, the same way on both ports: admission at accept, the TLS
//! handshake within a deadline, authentication once per connection, HTTP
//! served by hyper with bounded headers, an idle timeout, and a graceful
//! close (HTTP/2 GOAWAY) on idle or shutdown.
//!
//! Admission ([`Gate`]) counts three things per port: every open
//! connection (`max`), the unauthenticated ones (`max_unauthenticated`),
//! and the unauthenticated ones of each source address
//! (`max_unauthenticated_per_source`). A connection is unauthenticated
//! from accept until its handshake yields a valid client SVID, or until a
//! request on it is the first to prove a caller by a workload token
//! ([`PeerInfo::token_outcome`]); then it leaves the last two
//! counts. So whatever an anonymous client does, it
//! holds at most its per-source share of the unauthenticated slots, and
//! `max - max_unauthenticated` slots are always left for agents and
//! operators. A connection over a cap is closed at once, before any TLS
//! work, and counted on `/metrics`.
//!
//! A connection on which [`MAX_REFUSED_TOKENS`] workload tokens were
//! refused is closed, as one whose client only guesses.
//!
//! A connection is idle while no request is in flight (a streaming
//! response such as the revocation feed counts as in flight until it
//! ends); after `idle_timeout` (`unauthenticated_idle_timeout` while it
//! is unauthenticated) it is closed gracefully. HTTP/2 keepalive
//! pings find peers that vanished without closing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use mayfly_core::limits::{MAX_HEADER_BYTES, MAX_STREAMS};
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tonic::codegen::http::{Request, Response};

use crate::config::Connections as Limits;
use crate::identity::Authenticator;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

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

/// Which cap a connection met at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// `max` connections are open.
    Connections,
    /// `max_unauthenticated` connections are unauthenticated.
    Unauthenticated,
    /// This source has `max_unauthenticated_per_source` of them.
    Source,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Self::Connections => "connection_limit",
            Self::Unauthenticated => "unauthenticated_limit",
            Self::Source => "source_limit",
        }
    }
}

/// Admission for one port (see the module docs).
#[derive(Debug)]
pub struct Gate {
    port: Port,
    limits: Limits,
    /// One permit per open connection.
    open: Arc<Semaphore>,
    /// One permit per unauthenticated connection.
    unauthenticated: Arc<Semaphore>,
    /// Unauthenticated connections per source address.
    sources: Mutex<HashMap<IpAddr, usize>>,
    /// Open connections, by state.
    authenticated_gauge: Gauge,
    unauthenticated_gauge: Gauge,
    metrics: Arc<Metrics>,
}

impl Gate {
    /// Admission for `port` under `limits`.
    pub fn new(port: Port, limits: Limits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            port,
            open: Arc::new(Semaphore::new(limits.max)),
            unauthenticated: Arc::new(Semaphore::new(limits.max_unauthenticated)),
            sources: Mutex::new(HashMap::new()),
            authenticated_gauge: metrics.connections(port.as_str(), "authenticated"),
            unauthenticated_gauge: metrics.connections(port.as_str(), "unauthenticated"),
            limits,
            metrics,
        })
    }

    /// A slot for a new connection from `ip`, or why not.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let open = self
            .open
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Connections)?;
        let permit = self
            .unauthenticated
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Unauthenticated)?;
        {
            let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
            let n = sources.entry(ip).or_default();
            if *n >= self.limits.max_unauthenticated_per_source {
                return Err(Refusal::Source);
            }
            *n += 1;
        }
        self.unauthenticated_gauge.inc();
        Ok(Slot {
            _open: open,
            unauthenticated: Some(Unauthenticated {
                _permit: permit,
                gate: self.clone(),
                ip,
            }),
            authenticated_gauge: None,
        })
    }
}

/// An unauthenticated connection's share of the caps; given back when it
/// authenticates or closes.
struct Unauthenticated {
    _permit: OwnedSemaphorePermit,
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        let mut sources = self.gate.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = sources.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                sources.remove(&self.ip);
            }
        }
        self.gate.unauthenticated_gauge.dec();
    }
}

/// A connection's place under the caps of its port.
struct Slot {
    _open: OwnedSemaphorePermit,
    /// Held until the peer authenticates.
    unauthenticated: Option<Unauthenticated>,
    /// Set once authenticated, decremented when the connection goes.
    authenticated_gauge: Option<Gauge>,
}

impl Slot {
    /// The peer authenticated: it leaves the unauthenticated counts.
    fn authenticated(&mut self, gate: &Gate) {
        if self.unauthenticated.take().is_some() {
            gate.authenticated_gauge.inc();
            self.authenticated_gauge = Some(gate.authenticated_gauge.clone());
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(g) = &self.authenticated_gauge {
            g.dec();
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
        let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
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
        };
        let identity = auth.authenticate(tls.get_ref().1.peer_certificates());
        let mut idle = match &identity {
            Ok(c) => {
                self.slot.authenticated(&self.gate);
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
        let activity = Activity::new();
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
                    promoted = true;
                    self.slot.authenticated(&self.gate);
                    tracing::debug!(%remote, port, "connection authenticated by a workload token");
                    idle = limits.idle_timeout;
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

    fn limits(max: usize, unauth: usize, per_source: usize) -> Limits {
        Limits {
            max,
            max_unauthenticated: unauth,
            max_unauthenticated_per_source: per_source,
            ..Limits::default()
        }
    }

    #[test]
    fn admission_keeps_room_for_authenticated_connections() {
        let gate = Gate::new(Port::Grpc, limits(6, 3, 2), Arc::new(Metrics::new()));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Refusal::Source));
        let _b1 = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).err(), Some(Refusal::Unauthenticated));
        // One authenticates: its unauthenticated share comes back, so the
        // source may open another.
        let mut a1 = a1;
        a1.authenticated(&gate);
        let mut a3 = gate.admit(a).unwrap();
        a3.authenticated(&gate);
        let mut b2 = gate.admit(b).unwrap();
        b2.authenticated(&gate);
        let mut b3 = gate.admit(b).unwrap();
        b3.authenticated(&gate);
        // Six open (four authenticated, two not): the total cap holds.
        assert_eq!(gate.admit(b).err(), Some(Refusal::Connections));
        drop(b3);
        assert!(gate.admit(b).is_ok());
        assert_eq!(gate.sources.lock().unwrap().get(&a), Some(&1));
    }

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
