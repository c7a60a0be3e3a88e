//! Where the verifier's trust comes from: the CA bundle for the broker's
//! certificate (JWKS fetches, the feed) and, for the feed, the service's
//! own SVID. Either fixed PEM given in the configuration, or the SPIFFE
//! Workload API (the `spiffe` crate's `X509Source`), read afresh at each
//! JWKS fetch and feed reconnection so that rotations are followed.

use mayfly_core::svid::pem;
use spiffe::X509Source;
use spiffe::bundle::BundleSource;
use zeroize::Zeroizing;

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
    pub(crate) async fn workload_api(endpoint: &str) -> Result<Self, String> {
        X509Source::builder()
            .endpoint(endpoint)
            .initial_sync_timeout(std::time::Duration::from_secs(10))
            .build()
            .await
            .map(Self::WorkloadApi)
            .map_err(|e| format!("SPIFFE Workload API: {e}"))
    }

    /// The CA bundle (PEM) the broker's certificate must chain to.
    pub(crate) fn ca_pem(&self) -> Result<Vec<u8>, String> {
        match self {
            Self::Fixed { ca_pem, .. } => Ok(ca_pem.clone()),
            Self::WorkloadApi(source) => {
                let svid = source.svid().map_err(|e| e.to_string())?;
                let td = svid.spiffe_id().trust_domain();
                let bundle = source
                    .bundle_for_trust_domain(td)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("the Workload API has no bundle for {td}"))?;
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
    pub(crate) fn identity(&self) -> Result<Option<Identity>, String> {
        match self {
            Self::Fixed { identity, .. } => Ok(identity.clone()),
            Self::WorkloadApi(source) => {
                let svid = source.svid().map_err(|e| e.to_string())?;
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
