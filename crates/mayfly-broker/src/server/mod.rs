//! The broker as a whole: `Broker::build(config)?.serve(grpc_listener,
//! http_listener, shutdown)`. Listeners come from the caller so tests can
//! bind `127.0.0.1:0`.
//!
//! - `assemble.rs`: from checked [`Settings`](crate::config::Settings) to
//!   the parts (keys, store and trail, policy, service, authenticator);
//! - `serve.rs`: both ports and every background task, until shutdown,
//!   then draining.

mod assemble;
pub(crate) use assemble::redis_target;
mod serve;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::{Config, ConfigError, Connections, Reaper};
use crate::crl::CrlPublisher;
use crate::feed::FeedHub;
use crate::grpc::RevocationsApi;
use crate::identity::Authenticator;
use crate::issuer::{JwtSigner, KeyError};
use crate::policy::PolicyHandle;
use crate::service::Service;
use crate::status::StatusLists;
use crate::store::StoreError;
use crate::tls::{TlsError, TlsSetup};

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
    /// A `[[federation]]` entry is unusable.
    #[error(transparent)]
    Federation(#[from] crate::federation::FederationConfigError),
}

/// What the Shared Signals transmitter starts with.
#[derive(Debug)]
struct SignalsSetup {
    receivers: Vec<mayfly_core::SpiffeIdPattern>,
    push_ca_pem: Vec<u8>,
    push: mayfly_ssf::PushPolicy,
}

/// A broker ready to serve.
#[derive(Debug)]
pub struct Broker {
    /// Request handling, shared by both ports.
    service: Arc<Service>,
    /// Server configurations of both ports.
    tls: TlsSetup,
    /// Turns a peer certificate into a caller, once per connection.
    authenticator: Authenticator,
    /// Signs tokens; its JWKS is served on the HTTPS port.
    signer: Arc<JwtSigner>,
    /// `iss` of every token, and the metadata's issuer.
    issuer: String,
    /// When the reaper runs and how long records are kept.
    reaper: Reaper,
    /// The CRL, when task certificates are signed.
    crl: Option<Arc<CrlPublisher>>,
    /// Serves the Token Status Lists.
    status_lists: Arc<StatusLists>,
    /// Who may receive shared signals, and the CAs their push endpoints'
    /// certificates chain to.
    signals: SignalsSetup,
    /// Follows the store's revocation log for watchers and the CRL.
    feed: Arc<FeedHub>,
    /// The databases logins are made in: their dropper runs beside the
    /// reaper.
    databases: Vec<Arc<dyn mayfly_secrets::Engine>>,
    /// The Revocations service over the feed.
    revocations: RevocationsApi,
    /// The live policy set, reloaded by the watcher.
    policy: Arc<PolicyHandle>,
    /// How often the watcher looks for changed policy files.
    policy_reload: Duration,
    /// How often the TLS files are looked at for changes.
    tls_reload: Duration,
    /// Whose bundle the Workload API's identity is checked with.
    trust_domain: mayfly_core::TrustDomain,
    /// The key directory, the signing algorithm, and how often the key
    /// files are looked at for a rotation.
    keys: KeyWatch,
    /// The workload-token issuers, when any is configured.
    federation: Option<Arc<crate::federation::Federation>>,
    /// The issuing CAs and their files, followed every `tls_reload`.
    cas: Option<(Arc<crate::issuer::CaRing>, crate::issuer::CaFiles)>,
    /// The plain-text health port, when configured.
    health_listener: Option<TcpListener>,
    /// Bounds on each port's connections.
    connections: Connections,
}

/// What the signing-key watcher follows.
#[derive(Debug)]
struct KeyWatch {
    /// The key directory (`data_dir`).
    dir: std::path::PathBuf,
    alg: crate::issuer::Algorithm,
    /// `tokens.key_reload_interval`.
    interval: Duration,
    /// `tokens.rotate_every`, if the broker rotates keys itself.
    rotation: Option<crate::config::KeyRotation>,
}

impl Broker {
    /// Checks `config`, creates the data directory and keys if missing,
    /// opens the store and the trail, and loads TLS material and policies.
    pub fn build(config: Config) -> Result<Self, StartError> {
        Self::assemble(config.settings()?)
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
}
