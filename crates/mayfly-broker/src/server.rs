//! Assembles the broker from its configuration and serves both ports until
//! shutdown: `Broker::build(config)?.serve(grpc_listener, http_listener,
//! shutdown)`. Listeners come from the caller so tests can bind
//! `127.0.0.1:0`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use mayfly_core::SpiffeId;
use mayfly_proto::v1::admin_server::AdminServer;
use mayfly_proto::v1::broker_server::BrokerServer;
use mayfly_proto::v1::revocations_server::RevocationsServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::Connected;

use crate::audit::{AuditLog, AuditSink, FileSink, RedisSink, StdoutSink};
use crate::config::{Algorithm, AuditSinkKind, Config, ConfigError, RedisConfig, StoreKind};
use crate::crl::CrlPublisher;
use crate::feed::FeedHub;
use crate::fsutil::create_private_dir;
use crate::grpc::{AdminApi, BrokerApi, PeerInfo, RevocationsApi};
use crate::identity::Authenticator;
use crate::issuer::{IssuingCa, JwtSigner, KeyError, SigningKey, key_path};
use crate::metrics::{Metrics, RpcMetricsLayer};
use crate::policy::PolicyHandle;
use crate::ratelimit::RateLimiter;
use crate::service::{Limits, Service, TaskCache};
use crate::store::{EmbeddedStore, LeaseStore, RedisStore, RedisTarget, StoreError};
use crate::tls::{self, TlsError, TlsSetup};
use crate::{http, reaper};

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for open connections before closing them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request message: the biggest valid StartTask (4 KiB intent, 64
/// context entries of 1 KiB) fits with room to spare.
const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Concurrent requests on one HTTP/2 connection.
const MAX_STREAMS: u32 = 128;
/// Open connections per port; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 4096;
/// An HTTP/1 client must send its headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the broker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Bad TLS material.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Signing key problem.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The issuing CA could not be loaded.
    #[error(transparent)]
    Ca(#[from] crate::issuer::CaError),
    /// The store could not be opened.
    #[error("lease store: {0}")]
    Store(#[from] StoreError),
    /// Socket or file error.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The policies are invalid.
    #[error("invalid policies:\n{0}")]
    Policy(#[from] mayfly_policy::PolicyLoadError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The audit trail could not be opened.
    #[error("{0}")]
    Audit(#[from] crate::audit::AuditError),
}

/// A broker ready to serve.
#[derive(Debug)]
pub struct Broker {
    service: Arc<Service>,
    tls: TlsSetup,
    authenticator: Authenticator,
    signer: Arc<JwtSigner>,
    issuer: String,
    reaper: crate::config::Reaper,
    crl: Option<Arc<CrlPublisher>>,
    feed: Arc<FeedHub>,
    revocations: RevocationsApi,
    policy: Arc<PolicyHandle>,
    policy_reload: Duration,
    health_listener: Option<TcpListener>,
}

impl Broker {
    /// Creates the data directory and keys if missing, opens the store and
    /// loads TLS material.
    pub fn build(config: Config) -> Result<Self, StartError> {
        create_private_dir(&config.data_dir)?;
        let tls = tls::load(&config.tls)?;
        let alg = config.tokens.algorithm;
        let key = SigningKey::load_or_create(&config.data_dir, alg)?;
        // Publish the other algorithm's key too if one exists, so tokens
        // signed before an algorithm change keep validating until they expire.
        let other = match alg {
            Algorithm::ES256 => Algorithm::EdDSA,
            Algorithm::EdDSA => Algorithm::ES256,
        };
        let mut previous = Vec::new();
        if key_path(&config.data_dir, other).exists() {
            previous.push(SigningKey::load(&key_path(&config.data_dir, other), other)?);
        }
        let signer = Arc::new(JwtSigner::new(key, previous));
        // The Redis store also records credential leases for a trail in
        // the same Redis.
        let mut redis_store = None;
        let store: Arc<dyn LeaseStore> = match (&config.store, &config.redis) {
            (StoreKind::Embedded, _) => Arc::new(EmbeddedStore::open(&config.store_path())?),
            (StoreKind::Redis, Some(redis)) => {
                let store = Arc::new(
                    RedisStore::new(
                        redis_target(redis)?,
                        &redis.key_prefix,
                        config.reaper.retention,
                    )?
                    .with_replicas_to_ack(redis.replicas_to_ack),
                );
                redis_store = Some(store.clone());
                store
            }
            (other, _) => {
                return Err(ConfigError::Invalid(format!(
                    "store {other:?} is not fully configured"
                ))
                .into());
            }
        };
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let audit = open_audit(&config, &metrics, redis_store)?;
        let policy = Arc::new(PolicyHandle::load(&config.policy.dir)?);
        tracing::info!(policies = policy.len(), dir = %config.policy.dir.display(), "policies loaded");
        let issuer = config.issuer();
        let limits = Limits {
            token_default_ttl: config.tokens.default_ttl,
            token_max_ttl: config.tokens.max_ttl,
            task_default_ttl: config.tasks.default_ttl,
            task_max_ttl: config.tasks.max_ttl,
            cert_default_ttl: config.certificates.default_ttl,
            cert_max_ttl: config.certificates.max_ttl,
            approval_ttl: config.approvals.ttl,
            max_delegation_depth: config.tasks.max_delegation_depth,
        };
        let ca = match &config.ca {
            Some(files) => Some(Arc::new(IssuingCa::load(&files.cert, &files.key)?)),
            None => None,
        };
        let crl = ca.clone().map(|ca| {
            Arc::new(CrlPublisher::new(
                store.clone(),
                ca,
                config.certificates.crl_validity,
            ))
        });
        let revoked = Arc::new(tokio::sync::Notify::new());
        let feed = FeedHub::new(store.clone(), revoked.clone(), config.feed.poll);
        let broker_id = SpiffeId::new(&format!("spiffe://{}/mayfly/broker", config.trust_domain))
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let service = Arc::new(Service {
            store,
            policy: policy.clone(),
            signer: signer.clone(),
            issuer: issuer.clone(),
            limits,
            operators: config.operators.clone(),
            ca,
            revoked,
            introspection: config.introspection_grants()?,
            rate: RateLimiter::new(config.rate_limit.per_second, config.rate_limit.burst),
            broker_id,
            audit,
            metrics: metrics.clone(),
            tasks: TaskCache::default(),
        });
        let mut authenticator =
            Authenticator::new(tls.client_chain.clone(), config.trust_domain.clone());
        if let Some(ca) = &service.ca {
            tls::refuse_issuing_ca_in_bundle(&config.tls, ca.cert_der())?;
            authenticator = authenticator.refusing_issued_by(ca.cert_der());
        }
        Ok(Self {
            service,
            tls,
            authenticator,
            signer,
            issuer,
            reaper: config.reaper.clone(),
            crl,
            policy,
            policy_reload: config.policy.reload_interval,
            health_listener: None,
            revocations: RevocationsApi::new(
                feed.clone(),
                config.feed_watchers(),
                config.feed.heartbeat,
                metrics.feed_watchers.clone(),
            ),
            feed,
        })
    }

    /// The token issuer URL.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Also serves the gRPC health service alone, in plain text, on
    /// `listener` (`listen.health`), for probes without a client
    /// certificate.
    pub fn with_health_listener(mut self, listener: TcpListener) -> Self {
        self.health_listener = Some(listener);
        self
    }

    /// Serves gRPC on `grpc` and HTTPS on `http` until `shutdown` completes,
    /// then drains connections and returns once the store is released.
    pub async fn serve(
        mut self,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let store = self.service.store().clone();

        let (conn_tx, conn_rx) = mpsc::channel::<Result<TlsConn, io::Error>>(64);
        let acceptor = TlsAcceptor::from(self.tls.grpc.clone());
        let accept = tokio::spawn(accept_grpc(
            grpc,
            acceptor,
            self.authenticator.clone(),
            conn_tx,
            stop_rx.clone(),
        ));
        let mut grpc_stop = stop_rx.clone();
        let broker_api = BrokerServer::new(BrokerApi::new(self.service.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let admin_api = AdminServer::new(AdminApi::new(self.service.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (reporter, health_api) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let health_task = tokio::spawn(crate::health::follow_store(
            reporter,
            store.clone(),
            stop_rx.clone(),
        ));
        let (reflection_v1, reflection_v1alpha) = crate::health::reflection();
        let grpc_server = tonic::transport::Server::builder()
            .layer(RpcMetricsLayer(self.service.metrics.clone()))
            .max_concurrent_streams(MAX_STREAMS)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .timeout(Duration::from_secs(30))
            // Unauthenticated peers are refused before their request body is read.
            .add_service(InterceptedService::new(broker_api, require_peer))
            .add_service(InterceptedService::new(admin_api, require_peer))
            .add_service(InterceptedService::new(
                RevocationsServer::new(self.revocations.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
                require_peer,
            ))
            .add_service(InterceptedService::new(health_api.clone(), require_peer))
            .add_service(InterceptedService::new(reflection_v1, require_peer))
            .add_service(InterceptedService::new(reflection_v1alpha, require_peer))
            .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async move {
                stopped(&mut grpc_stop).await;
            });
        let mut grpc_task = tokio::spawn(grpc_server);
        let plain_health_task = self.health_listener.take().map(|listener| {
            let mut stop = stop_rx.clone();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(health_api)
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        async move { stopped(&mut stop).await },
                    ),
            )
        });

        let algs = [self.signer.alg()];
        let router = http::router(
            self.signer.jwks(),
            &http::metadata(&self.issuer, &algs),
            self.service.clone(),
            self.crl.clone(),
        );
        let http_task = tokio::spawn(serve_http(
            http,
            TlsAcceptor::from(self.tls.http.clone()),
            self.authenticator.clone(),
            router,
            stop_rx.clone(),
        ));
        let feed_task = tokio::spawn(self.feed.clone().run(stop_rx.clone()));
        let policy_task = tokio::spawn(crate::policy::watch_and_reload(
            self.policy.clone(),
            self.service.clone(),
            self.policy_reload,
            stop_rx.clone(),
        ));
        let reaper_task = tokio::spawn(reaper::run(
            store.clone(),
            self.service.audit.clone(),
            self.service.broker_id.clone(),
            self.reaper.interval,
            self.reaper.retention,
            stop_rx.clone(),
        ));
        tracing::info!(issuer = %self.issuer, kid = %self.signer.kid(), "broker serving");

        let early = tokio::select! {
            () = shutdown => None,
            r = &mut grpc_task => Some(r),
        };
        let _ = stop_tx.send(true);
        let result = match early {
            Some(r) => r.map_err(|e| io::Error::other(e.to_string()))?,
            None => grpc_task
                .await
                .map_err(|e| io::Error::other(e.to_string()))?,
        };
        let _ = accept.await;
        let _ = http_task.await;
        let _ = reaper_task.await;
        let _ = feed_task.await;
        let _ = policy_task.await;
        let _ = health_task.await;
        if let Some(t) = plain_health_task {
            let _ = t.await;
        }
        drop(self);
        drop(store);
        tracing::info!("broker stopped");
        result.map_err(StartError::from)
    }
}

/// Refuses, before the body is decoded, requests on a connection whose peer
/// did not authenticate; handlers still obtain their caller through
/// [`crate::grpc::caller`].
fn require_peer(req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    crate::grpc::caller(&req)?;
    Ok(req)
}

/// Resolves once the stop flag is set (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Where the configured Redis is, reading secrets from their files.
/// Opens the configured audit sink and starts its writer (on the current
/// Tokio runtime). A Redis trail records credential leases in the same
/// step as their records, through `redis_store` (the same Redis).
fn open_audit(
    config: &Config,
    metrics: &Arc<Metrics>,
    redis_store: Option<Arc<RedisStore>>,
) -> Result<AuditLog, StartError> {
    let sink: Arc<dyn AuditSink> = match (config.audit_sink(), &config.redis) {
        (AuditSinkKind::File, _) => {
            let path = config.audit_path();
            let sink = FileSink::open(&path)?;
            tracing::info!(path = %path.display(), seq = sink.head().seq, "audit trail");
            Arc::new(sink)
        }
        (AuditSinkKind::Redis, Some(redis)) => {
            let sink = RedisSink::new(redis_target(redis)?, &redis.key_prefix)?;
            Arc::new(match redis_store {
                Some(store) => sink.with_store(store),
                None => sink,
            })
        }
        (AuditSinkKind::Stdout, _) => Arc::new(StdoutSink::new()),
        (AuditSinkKind::Off, _) => {
            tracing::warn!("the audit trail is off ([audit] sink = \"off\")");
            return Ok(AuditLog::off(Some(metrics.clone())));
        }
        (AuditSinkKind::Redis, None) => {
            return Err(
                ConfigError::Invalid("[audit] sink = \"redis\" needs [redis]".into()).into(),
            );
        }
    };
    Ok(AuditLog::start_counted(sink, Some(metrics.clone())))
}

fn redis_target(r: &RedisConfig) -> Result<RedisTarget, StartError> {
    let read = |p: &std::path::Path| -> Result<String, StartError> {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .map_err(|e| StartError::Io(io::Error::new(e.kind(), format!("{}: {e}", p.display()))))
    };
    if !r.sentinels.is_empty() {
        return Ok(RedisTarget::Sentinel {
            sentinels: r.sentinels.clone(),
            master_name: r.master_name.clone().unwrap_or_default(),
            password: r.password_file.as_deref().map(read).transpose()?,
        });
    }
    let url = match (&r.url, &r.url_file) {
        (Some(u), _) => u.clone(),
        (None, Some(f)) => read(f)?,
        (None, None) => return Err(ConfigError::Invalid("[redis] needs url".into()).into()),
    };
    let ca_pem = match &r.ca {
        Some(p) => Some(std::fs::read(p).map_err(|e| {
            StartError::Io(io::Error::new(e.kind(), format!("{}: {e}", p.display())))
        })?),
        None => None,
    };
    Ok(RedisTarget::Url { url, ca_pem })
}

/// A TLS connection with what authentication learned about its peer.
struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
    /// Frees a connection slot when the connection is dropped.
    _slot: OwnedSemaphorePermit,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP, completes TLS off the accept loop, authenticates the peer
/// once, and hands the connection to tonic.
async fn accept_grpc(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    auth: Authenticator,
    conns: mpsc::Sender<Result<TlsConn, io::Error>>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    while let Some((tcp, remote)) = next_connection(&listener, &mut stop).await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "connection limit reached; refusing connection");
            continue;
        };
        let (acceptor, auth, conns) = (acceptor.clone(), auth.clone(), conns.clone());
        tokio::spawn(async move {
            let Some(stream) = handshake(&acceptor, tcp, remote).await else {
                return;
            };
            let identity = auth.authenticate(stream.get_ref().1.peer_certificates());
            match &identity {
                Ok(c) => tracing::debug!(%remote, caller = %c.id, "authenticated connection"),
                Err(e) => tracing::info!(%remote, error = %e, "unauthenticated connection"),
            }
            let peer = PeerInfo {
                identity: Arc::new(identity),
                remote,
            };
            let _ = conns
                .send(Ok(TlsConn {
                    stream,
                    peer,
                    _slot: slot,
                }))
                .await;
        });
    }
}

/// The next TCP connection, or `None` once `stop` is set. Accept errors
/// (such as running out of file descriptors) are logged and retried after a
/// pause rather than ending the server.
async fn next_connection(
    listener: &TcpListener,
    stop: &mut watch::Receiver<bool>,
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
            () = stopped(stop) => return None,
        }
    }
}

/// Completes a TLS handshake within [`HANDSHAKE_TIMEOUT`].
async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%remote, "TLS handshake timed out");
            None
        }
    }
}

/// Serves the HTTPS side port until `stop`, then drains connections.
async fn serve_http(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    auth: Authenticator,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    while let Some((tcp, remote)) = next_connection(&listener, &mut stop).await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "connection limit reached; refusing connection");
            continue;
        };
        let (acceptor, auth, router) = (acceptor.clone(), auth.clone(), router.clone());
        let watcher = graceful.watcher();
        conns.spawn(async move {
            let _slot = slot;
            let Some(tls) = handshake(&acceptor, tcp, remote).await else {
                return;
            };
            // As on the gRPC port: who the peer is, once per connection.
            let peer = PeerInfo {
                identity: Arc::new(auth.authenticate(tls.get_ref().1.peer_certificates())),
                remote,
            };
            let service = TowerToHyperService::new(router.layer(axum::Extension(peer)));
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%remote, error = %e, "HTTPS connection ended with an error");
            }
        });
        // Reap finished connection tasks as we go.
        while conns.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
    // Whatever did not drain is closed, so nothing holds the store after
    // `serve` returns.
    conns.shutdown().await;
}
