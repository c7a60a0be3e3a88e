//! Follows the broker's revocation feed and keeps the set of revoked,
//! unexpired credentials. Reconnects with its last cursor, so a disconnect
//! loses nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mayfly_proto::v1 as pb;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::config::FeedConfig;
use crate::material::{Material, TrustError};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the follower knows.
#[derive(Debug, Default)]
pub(crate) struct RevocationSet {
    /// Revoked lease ids (`jti`) → credential expiry (unix seconds).
    leases: RwLock<HashMap<String, u64>>,
    /// Revoked certificate serials (upper-case hex) → expiry.
    serials: RwLock<HashMap<String, u64>>,
    /// The last cursor received.
    cursor: AtomicU64,
    /// When the feed last said anything (unix ms); 0 = never.
    last_heard: AtomicU64,
    /// Set once a replay has completed (the first heartbeat).
    synced: AtomicBool,
}

impl RevocationSet {
    pub(crate) fn is_revoked(&self, jti: &str) -> bool {
        self.leases.read().is_ok_and(|m| m.contains_key(jti))
    }

    pub(crate) fn is_serial_revoked(&self, serial: &str) -> bool {
        self.serials
            .read()
            .is_ok_and(|m| m.contains_key(&serial.to_ascii_uppercase()))
    }

    /// How long since the feed last spoke; `None` before the first sync.
    pub(crate) fn silence(&self) -> Option<Duration> {
        if !self.synced.load(Ordering::Acquire) {
            return None;
        }
        let last = self.last_heard.load(Ordering::Acquire);
        Some(Duration::from_millis(now_ms().saturating_sub(last)))
    }

    pub(crate) fn cursor(&self) -> u64 {
        self.cursor.load(Ordering::Acquire)
    }

    fn apply(&self, e: &pb::RevocationEvent) {
        self.last_heard.store(now_ms(), Ordering::Release);
        if e.heartbeat {
            self.synced.store(true, Ordering::Release);
            self.prune();
        } else {
            let exp = e
                .expires_at
                .as_ref()
                .map_or(0, |t| u64::try_from(t.seconds).unwrap_or(0));
            if !e.lease_id.is_empty()
                && let Ok(mut m) = self.leases.write()
            {
                m.insert(e.lease_id.clone(), exp);
            }
            if !e.serial.is_empty()
                && let Ok(mut m) = self.serials.write()
            {
                m.insert(e.serial.to_ascii_uppercase(), exp);
            }
        }
        self.cursor.fetch_max(e.cursor, Ordering::AcqRel);
    }

    /// Forgets revocations of credentials that have expired anyway (with a
    /// minute's margin for validators' leeway).
    fn prune(&self) {
        let cutoff = now_ms() / 1000;
        let keep = |exp: &mut u64| *exp + 60 > cutoff;
        if let Ok(mut m) = self.leases.write() {
            m.retain(|_, e| keep(e));
        }
        if let Ok(mut m) = self.serials.write() {
            m.retain(|_, e| keep(e));
        }
    }

    /// How many revocations are held.
    pub(crate) fn len(&self) -> usize {
        self.leases.read().map_or(0, |m| m.len())
    }
}

/// Follows the feed until the set is dropped by every verifier.
pub(crate) async fn follow(
    config: FeedConfig,
    trust: Material,
    set: std::sync::Weak<RevocationSet>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(strong) = set.upgrade() else {
            return;
        };
        match stream_once(&config, &trust, &strong).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %e, cursor = strong.cursor(), "revocation feed disconnected; reconnecting")
            }
        }
        drop(strong);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Why a connection to the feed ended.
#[derive(Debug, thiserror::Error)]
enum FeedError {
    /// The CA bundle or the service's SVID could not be had.
    #[error("{0}")]
    Trust(#[from] TrustError),
    /// The broker URL does not parse.
    #[error("{0}")]
    BadUrl(#[source] http::uri::InvalidUri),
    /// The TLS material does not make a client configuration.
    #[error("{0}")]
    Tls(#[source] tonic::transport::Error),
    /// The connection failed.
    #[error("connect: {0}")]
    Connect(#[source] tonic::transport::Error),
    /// The broker refused the watch, or the stream failed.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(#[source] tonic::Status),
    /// The broker ended the stream.
    #[error("feed closed by the broker")]
    Closed,
}

async fn stream_once(
    config: &FeedConfig,
    trust: &Material,
    set: &Arc<RevocationSet>,
) -> Result<(), FeedError> {
    // Read at each connection: from the Workload API, the bundle and the
    // SVID may have rotated since the last one.
    let (cert_pem, key_pem) = match trust.identity()? {
        Some(id) => id,
        None => (config.cert_pem.clone(), config.key_pem.clone().into()),
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(trust.ca_pem()?))
        .identity(Identity::from_pem(&cert_pem, &*key_pem));
    let channel = Channel::from_shared(config.broker.clone())
        .map_err(FeedError::BadUrl)?
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)
        .map_err(FeedError::Tls)?
        .connect()
        .await
        .map_err(FeedError::Connect)?;
    let mut client = pb::revocations_client::RevocationsClient::new(channel);
    let mut stream = client
        .watch_revocations(pb::WatchRequest {
            from_cursor: set.cursor(),
        })
        .await
        .map_err(FeedError::Status)?
        .into_inner();
    loop {
        match stream.message().await {
            Ok(Some(e)) => set.apply(&e),
            Ok(None) => return Err(FeedError::Closed),
            Err(s) => return Err(FeedError::Status(s)),
        }
    }
}
