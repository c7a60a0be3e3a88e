//! Assembles the broker from its configuration and serves both ports until
//! shutdown: `Broker::build(config)?.serve(grpc_listener, http_listener,
//! shutdown)`. Listeners come from the caller so tests can bind
//! `127.0.0.1:0`.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use mayfly_core::SpiffeId;
use mayfly_core::limits::MAX_MESSAGE_BYTES;
use mayfly_proto::v1::admin_server::AdminServer;
use mayfly_proto::v1::broker_server::BrokerServer;
use mayfly_proto::v1::revocations_server::RevocationsServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tower::ServiceBuilder;

use crate::audit::{AuditSink, FileSink, OffSink, RedisSink, StdoutSink};
use crate::config::{Algorithm, AuditSinkKind, Config, ConfigError, RedisConfig, StoreKind};
use crate::connections::PeerInfo;
use crate::connections::{self, Gate, Port};
use crate::crl::CrlPublisher;
use crate::feed::FeedHub;
use crate::fsutil::create_private_dir;
use crate::grpc::{AdminApi, BrokerApi, GrpcEdgeLayer, RevocationsApi};
use crate::identity::Authenticator;
use crate::issuer::{IssuingCa, JwtSigner, KeyError, SigningKey, key_path};
use crate::metrics::RpcMetricsLayer;
use crate::policy::PolicyHandle;
use crate::ratelimit::RateLimiter;
use crate::recorder::Recorder;
use crate::service::{Admin, Issuance, Limits, Service};
use crate::stop::stopped;
use crate::store::{EmbeddedStore, LeaseStore, RedisStore, RedisTarget, StoreError};
use crate::tls::{self, TlsError, TlsSetup};
use crate::{http, reaper};

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
    /// Bounds on each port's connections.
    connections: crate::config::Connections,
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
        // The Redis store's own trail: leases and records in one script.
        let mut redis_trail = None;
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
                redis_trail = Some(store.trail());
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
        let broker_id = SpiffeId::new(&format!("spiffe://{}/mayfly/broker", config.trust_domain))
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let trail = open_audit(&config, redis_trail)?;
        let audit = Recorder::start(
            trail,
            store.clone(),
            broker_id.clone(),
            Some(metrics.clone()),
        );
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
        let service = Arc::new(Service::new(
            store,
            policy.clone(),
            audit,
            metrics.clone(),
            revoked,
            Issuance {
                signer: signer.clone(),
                issuer: issuer.clone(),
                ca,
                limits,
                rate: RateLimiter::new(config.rate_limit.per_second, config.rate_limit.burst),
                introspection: config.introspection_grants()?,
            },
            Admin {
                operators: config.operators.clone(),
                broker_id,
            },
        ));
        let mut authenticator =
            Authenticator::new(tls.client_chain.clone(), config.trust_domain.clone());
        if let Some(ca) = service.ca() {
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
            connections: config.connections.clone(),
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
        let metrics = self.service.metrics().clone();

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
        // Unauthenticated peers are refused before their request body is read.
        let routes = Routes::new(InterceptedService::new(broker_api, require_peer))
            .add_service(InterceptedService::new(admin_api, require_peer))
            .add_service(InterceptedService::new(
                RevocationsServer::new(self.revocations.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
                require_peer,
            ))
            .add_service(InterceptedService::new(health_api.clone(), require_peer))
            .add_service(InterceptedService::new(reflection_v1, require_peer))
            .add_service(InterceptedService::new(reflection_v1alpha, require_peer))
            .prepare();
        let grpc_service = ServiceBuilder::new()
            .layer(RpcMetricsLayer(metrics.clone()))
            .layer(GrpcEdgeLayer)
            .service(routes);
        let mut grpc_task = tokio::spawn(connections::serve(
            grpc,
            Gate::new(Port::Grpc, self.connections.clone(), metrics.clone()),
            TlsAcceptor::from(self.tls.grpc.clone()),
            self.authenticator.clone(),
            move |peer: PeerInfo| {
                ServiceBuilder::new()
                    .layer(axum::Extension(peer))
                    .service(grpc_service.clone())
            },
            stop_rx.clone(),
        ));
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
        let http_task = tokio::spawn(connections::serve(
            http,
            Gate::new(Port::Https, self.connections.clone(), metrics.clone()),
            TlsAcceptor::from(self.tls.http.clone()),
            self.authenticator.clone(),
            move |peer: PeerInfo| router.clone().layer(axum::Extension(peer)),
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
            self.service.recorder().clone(),
            self.service.broker_id().clone(),
            self.reaper.interval,
            self.reaper.retention,
            stop_rx.clone(),
        ));
        tracing::info!(issuer = %self.issuer, kid = %self.signer.kid(), "broker serving");

        let early = tokio::select! {
            () = shutdown => false,
            _ = &mut grpc_task => true,
        };
        let _ = stop_tx.send(true);
        if !early {
            let _ = grpc_task.await;
        }
        let _ = http_task.await;
        let _ = reaper_task.await;
        let _ = feed_task.await;
        let _ = policy_task.await;
        let _ = health_task.await;
        let plain_health = match plain_health_task {
            Some(t) => t.await.map_err(|e| io::Error::other(e.to_string()))?,
            None => Ok(()),
        };
        drop(self);
        drop(store);
        tracing::info!("broker stopped");
        if early {
            return Err(io::Error::other("the gRPC port stopped accepting connections").into());
        }
        plain_health.map_err(StartError::from)
    }
}

/// Refuses, before the body is decoded, requests on a connection whose peer
/// did not authenticate; handlers still obtain their caller through
/// [`crate::grpc::caller`].
fn require_peer(req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    crate::grpc::caller(&req)?;
    Ok(req)
}

/// Opens the configured audit trail. A Redis trail is the Redis store's
/// own (`redis_trail`) when there is one, so the store writes credential
/// leases in the same script as their records.
fn open_audit(
    config: &Config,
    redis_trail: Option<RedisSink>,
) -> Result<Arc<dyn AuditSink>, StartError> {
    Ok(match (config.audit_sink(), &config.redis) {
        (AuditSinkKind::File, _) => {
            let path = config.audit_path();
            let sink = FileSink::open_with(&path, config.audit_file_options())?;
            tracing::info!(path = %path.display(), seq = sink.head().seq, "audit trail");
            Arc::new(sink)
        }
        (AuditSinkKind::Redis, Some(redis)) => {
            let sink = match redis_trail {
                Some(own) => own,
                None => RedisSink::new(redis_target(redis)?, &redis.key_prefix)?,
            };
            Arc::new(sink.with_retention(config.audit.retention))
        }
        (AuditSinkKind::Stdout, _) => Arc::new(StdoutSink::new()),
        (AuditSinkKind::Off, _) => {
            tracing::warn!("the audit trail is off ([audit] sink = \"off\")");
            Arc::new(OffSink)
        }
        (AuditSinkKind::Redis, None) => {
            return Err(
                ConfigError::Invalid("[audit] sink = \"redis\" needs [redis]".into()).into(),
            );
        }
    })
}

/// Where the configured Redis is, reading secrets from their files.
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
