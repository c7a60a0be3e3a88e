//! Where the verifier's trust comes from: the CA bundle for the broker's
//! certificate (JWKS fetches, the feed) and, for the feed, the service's
//! own SVID. Either fixed PEM given in the configuration, or the SPIFFE
//! Workload API (the `spiffe` crate's `X509Source`), read afresh at each
//! JWKS fetch and feed reconnection so that rotations are followed.

use std::sync::Arc;

use mayfly_core::svid::pem;
use spiffe::bundle::BundleSource;
use spiffe::{X509Source, X509SourceError};
use zeroize::Zeroizing;

/// Why the trust material could not be had from the SPIFFE Workload API.
/// `Clone` (the `spiffe` crate's error is shared) so that a [`JwksError`]
/// holding it can be said again.
///
/// [`JwksError`]: crate::JwksError
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// The Workload API did not give an SVID and a bundle in time.
    #[error("SPIFFE Workload API: {0}")]
    Connect(#[source] Arc<X509SourceError>),
    /// The Workload API's source has no usable SVID or bundle now.
    #[error("{0}")]
    Source(#[source] Arc<X509SourceError>),
    /// The Workload API has no bundle for the service's own trust domain.
    #[error("the Workload API has no bundle for {0}")]
    NoBundle(String),
}

/// A certificate chain and its private key, both PEM (the key wiped on
/// drop).
pub(crate) type Identity = (Vec<u8>, Zeroizing<Vec<u8>>);

/// The trust material, as it stands when asked.
#[derive(Clone)]
pub(crate) enum Material {
    /// From the configuration.
    Fixed {
        ca_pem: Vec<u8>,
        identity: Option<Identity>,
    },
    /// From the Workload API: the bundle of the service's own trust
    /// domain, and its SVID.
    WorkloadApi(X509Source),
}

impl Material {
    /// Connects to the Workload API at `endpoint` and waits for its first
    /// SVID and bundle.
    pub(crate) async fn workload_api(endpoint: &str) -> Result<Self, TrustError> {
        X509Source::builder()
            .endpoint(endpoint)
            .initial_sync_timeout(std::time::Duration::from_secs(10))
            .build()
            .await
            .map(Self::WorkloadApi)
            .map_err(|e| TrustError::Connect(Arc::new(e)))
    }

    /// The CA bundle (PEM) the broker's certificate must chain to.
    pub(crate) fn ca_pem(&self) -> Result<Vec<u8>, TrustError> {
        match self {
            Self::Fixed { ca_pem, .. } => Ok(ca_pem.clone()),
            Self::WorkloadApi(source) => {
                let svid = source.svid().map_err(source_error)?;
                let td = svid.spiffe_id().trust_domain();
                let bundle = source
                    .bundle_for_trust_domain(td)
                    .map_err(source_error)?
                    .ok_or_else(|| TrustError::NoBundle(td.to_string()))?;
                Ok(bundle
                    .authorities()
                    .iter()
                    .map(|c| pem("CERTIFICATE", c.as_bytes()))
                    .collect::<String>()
                    .into_bytes())
            }
        }
    }

    /// The service's own certificate chain and key (PEM), for the feed.
    pub(crate) fn identity(&self) -> Result<Option<Identity>, TrustError> {
        match self {
            Self::Fixed { identity, .. } => Ok(identity.clone()),
            Self::WorkloadApi(source) => {
                let svid = source.svid().map_err(source_error)?;
                let chain = svid
                    .cert_chain()
                    .iter()
                    .map(|c| pem("CERTIFICATE", c.as_bytes()))
                    .collect::<String>()
                    .into_bytes();
                let key =
                    Zeroizing::new(pem("PRIVATE KEY", svid.private_key().as_bytes()).into_bytes());
                Ok(Some((chain, key)))
            }
        }
    }
}

fn source_error(e: X509SourceError) -> TrustError {
    TrustError::Source(Arc::new(e))
}
