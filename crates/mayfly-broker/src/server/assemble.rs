//! From checked settings to a broker ready to serve: keys, the store and
//! its trail, the recorder, policy, the service and the authenticator.
//! Nothing here checks the configuration again; what can go wrong is
//! reading files and opening stores.

use std::io;
use std::path::Path;
use std::sync::Arc;

use super::{Broker, StartError};
use crate::audit::{AuditSink, FileSink, OffSink, StdoutSink};
use crate::config::{RedisEndpoint, RedisSettings, RedisTrail, Settings, StoreSettings, Trail};
use crate::crl::CrlPublisher;
use crate::federation::Federation;
use crate::feed::FeedHub;
use crate::fsutil::create_private_dir;
use crate::grpc::RevocationsApi;
use crate::identity::Authenticator;
use crate::issuer::CaRing;
use crate::policy::PolicyHandle;
use crate::ratelimit::RateLimiter;
use crate::recorder::Recorder;
use crate::service::{Service, Setup};
use crate::status::StatusLists;
use crate::store::{EmbeddedStore, LeaseStore, RedisStore, RedisTarget};
use crate::tls;

/// Where each CA's CRL is served: `<issuer>/crl/<id>`.
pub(super) fn crl_base(issuer: &str) -> String {
    format!("{}/crl", issuer.trim_end_matches('/'))
}

impl Broker {
    /// Builds every part from `s`.
    pub(super) fn assemble(s: Settings) -> Result<Self, StartError> {
        create_private_dir(&s.data_dir)?;
        let ca = match &s.ca {
            Some(files) => Some(Arc::new(CaRing::load(files, &crl_base(&s.issuer))?)),
            None => None,
        };
        let tls = tls::load(&s.tls, ca.clone())?;
        let federation = match s.federation.as_slice() {
            [] => None,
            entries => Some(Arc::new(Federation::load(
                entries,
                &s.issuer,
                &s.trust_domain,
            )?)),
        };
        let ca_ring = ca.clone();
        let signer = Arc::new(crate::issuer::signer(
            &s.data_dir,
            s.algorithm,
            s.key_retire_after,
        )?);
        let store = open_store(&s)?;
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let audit = Recorder::start(store.clone(), s.broker_id.clone(), Some(metrics.clone()));
        let policy = Arc::new(PolicyHandle::load(&s.policy.dir)?);
        tracing::info!(policies = policy.len(), dir = %s.policy.dir.display(), "policies loaded");
        let crl = ca
            .clone()
            .map(|ca| Arc::new(CrlPublisher::new(store.clone(), ca, s.crl_validity)));
        let status_lists = Arc::new(StatusLists::new(
            store.clone(),
            signer.clone(),
            &s.issuer,
            s.status_list_ttl,
        ));
        let revoked = Arc::new(tokio::sync::Notify::new());
        let feed = FeedHub::new(store.clone(), revoked.clone(), s.feed.poll);
        let mut authenticator =
            Authenticator::new(tls.client_chain.clone(), s.trust_domain.clone()).with_federated(
                s.tls
                    .federated
                    .iter()
                    .map(|f| f.trust_domain.clone())
                    .collect(),
            );
        if let Some(ca) = &ca {
            authenticator = authenticator.refusing_issued_by(ca.clone());
        }
        let service = Arc::new(Service::new(Setup {
            store,
            policy: policy.clone(),
            recorder: audit,
            metrics: metrics.clone(),
            revoked,
            broker_id: s.broker_id,
            operators: s.operators,
            lifetimes: s.lifetimes,
            signer: signer.clone(),
            issuer: s.issuer.clone(),
            ca,
            rate: RateLimiter::new(s.rate_limit.per_second, s.rate_limit.burst),
            introspection: s.introspection,
            resource_servers: s.resource_servers,
            gateways: s.gateways,
            databases: s.databases.clone(),
        }));
        Ok(Self {
            databases: s.databases,
            service,
            tls,
            authenticator,
            signer,
            issuer: s.issuer,
            reaper: s.reaper,
            crl,
            status_lists,
            signals: super::SignalsSetup {
                receivers: s.feed.watchers.clone(),
                push: s.ssf_push.clone(),
                // Receivers' push endpoints are checked against the trust
                // bundle (none with the Workload API: push then reaches
                // only loopback receivers over http).
                push_ca_pem: if s.tls.trust_bundle.as_os_str().is_empty() {
                    Vec::new()
                } else {
                    std::fs::read(&s.tls.trust_bundle)?
                },
            },
            policy,
            policy_reload: s.policy.reload_interval,
            tls_reload: s.tls.reload_interval,
            trust_domain: s.trust_domain.clone(),
            keys: super::KeyWatch {
                dir: s.data_dir.clone(),
                alg: s.algorithm,
                interval: s.key_reload,
                rotation: s.key_rotation,
            },
            cas: ca_ring.zip(s.ca.clone()),
            federation,
            health_listener: None,
            connections: s.connections,
            revocations: RevocationsApi::new(
                feed.clone(),
                s.feed.watchers,
                s.feed.heartbeat,
                metrics.feed_watchers.clone(),
            ),
            feed,
        })
    }
}

/// The lease store, recording to its trail. A Redis trail is the Redis
/// store's own, so the store writes leases in the same script as their
/// records.
fn open_store(s: &Settings) -> Result<Arc<dyn LeaseStore>, StartError> {
    Ok(match &s.store {
        StoreSettings::Embedded { path, trail } => {
            Arc::new(EmbeddedStore::open(path)?.recording_to(open_trail(trail)?))
        }
        StoreSettings::Redis { redis, trail } => {
            let store =
                RedisStore::new(redis_target(redis)?, &redis.key_prefix, s.reaper.retention)?
                    .with_replicas_to_ack(redis.replicas_to_ack);
            Arc::new(match trail {
                RedisTrail::Stream { retention } => store.with_trail_retention(*retention),
                RedisTrail::Outside(t) => store.recording_to(open_trail(t)?),
            })
        }
    })
}

/// A trail outside the store.
fn open_trail(trail: &Trail) -> Result<Arc<dyn AuditSink>, StartError> {
    Ok(match trail {
        Trail::File { path, options } => {
            let sink = FileSink::open_with(path, options.clone())?;
            tracing::info!(path = %path.display(), seq = sink.head().seq, "audit trail");
            Arc::new(sink)
        }
        Trail::Stdout => Arc::new(StdoutSink::new()),
        Trail::Off => {
            tracing::warn!("the audit trail is off ([audit] sink = \"off\")");
            Arc::new(OffSink)
        }
    })
}

/// Where Redis is, reading secrets from their files.
pub(crate) fn redis_target(r: &RedisSettings) -> Result<RedisTarget, StartError> {
    let io_error = |p: &Path, e: io::Error| {
        StartError::Io(io::Error::new(e.kind(), format!("{}: {e}", p.display())))
    };
    let read = |p: &Path| -> Result<String, StartError> {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .map_err(|e| io_error(p, e))
    };
    let ca_pem = match &r.ca {
        Some(p) => Some(std::fs::read(p).map_err(|e| io_error(p, e))?),
        None => None,
    };
    let url = match &r.endpoint {
        RedisEndpoint::Sentinel {
            sentinels,
            master_name,
            password_file,
        } => {
            return Ok(RedisTarget::Sentinel {
                sentinels: sentinels.clone(),
                master_name: master_name.clone(),
                password: password_file.as_deref().map(read).transpose()?,
                ca_pem,
            });
        }
        RedisEndpoint::Url(url) => url.clone(),
        RedisEndpoint::UrlFile(file) => read(file)?,
    };
    Ok(RedisTarget::Url { url, ca_pem })
}
