//! An issuer's JWKS: fetched over HTTPS with a pinned CA (or given once),
//! cached by `kid`, refetched when a token names a key the cache lacks (at
//! most once per interval). Only keys of the algorithms the caller allows
//! are kept. The verifier uses it for Mayfly's keys; the broker for the
//! issuers of federated workload tokens.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use jsonwebtoken::jwk::{JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::Mutex;

use crate::VerifyError;
use crate::material::{Material, TrustError};

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// How long one fetch may take.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an issuer's JWKS could not be fetched or used: the step that
/// failed, and the error underneath as [`source`](std::error::Error::source).
/// `Clone` (errors underneath are shared) so that a failed fetch can be
/// said again to the callers held back until the next.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The JWKS URL does not parse.
    #[error("bad JWKS URL: {0}")]
    BadUrl(#[source] Arc<http::uri::InvalidUri>),
    /// The JWKS URL is not `https://`.
    #[error("the JWKS URL must be https://")]
    NotHttps,
    /// The JWKS URL names no host.
    #[error("JWKS URL has no host")]
    NoHost,
    /// The URL's host is not a name TLS can check a certificate against.
    #[error("{0}")]
    ServerName(#[source] Arc<rustls_pki_types::InvalidDnsNameError>),
    /// The CA bundle could not be had from the SPIFFE Workload API.
    #[error("{0}")]
    Trust(#[source] TrustError),
    /// The CA bundle is not PEM.
    #[error("bad CA PEM: {0}")]
    CaPem(#[source] Arc<rustls_pki_types::pem::Error>),
    /// A certificate of the CA bundle is not a usable trust anchor.
    #[error("bad CA: {0}")]
    Ca(#[source] rustls::Error),
    /// No TLS client could be configured.
    #[error("{0}")]
    Tls(#[source] rustls::Error),
    /// The TCP connection to the JWKS host failed.
    #[error("connect {host}:{port}: {source}")]
    Connect {
        /// The URL's host.
        host: String,
        /// The URL's port (443 if it names none).
        port: u16,
        /// What the connection attempt met.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The TLS handshake failed (the server's certificate does not chain
    /// to the CA bundle, …).
    #[error("TLS: {0}")]
    Handshake(#[source] Arc<std::io::Error>),
    /// The HTTP exchange failed.
    #[error("{0}")]
    Http(#[source] Arc<hyper::Error>),
    /// The request could not be built.
    #[error("{0}")]
    Request(#[source] Arc<http::Error>),
    /// The server answered with a status other than success.
    #[error("JWKS answered {0}")]
    Status(http::StatusCode),
    /// The body could not be read, or is over the size limit.
    #[error("JWKS body: {0}")]
    Body(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// A document given to [`Jwks::replace`] is over the size limit.
    #[error("JWKS is over {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    /// The document is not a JWK set.
    #[error("JWKS is not a JWK set: {0}")]
    NotAJwkSet(#[source] Arc<serde_json::Error>),
    /// The fetch took longer than its timeout.
    #[error("fetch timed out")]
    TimedOut,
}

/// Failures are equal when they are of the same kind and say the same:
/// the errors underneath cannot be compared, and what they say is what a
/// caller acts on.
impl PartialEq for JwksError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

impl Eq for JwksError {}

/// One usable key: the algorithm it signs with, and the key.
#[derive(Clone)]
pub struct JwksKey {
    /// From the JWK's `alg`, or for a JWK without one, from its key type
    /// (EC P-256: ES256, P-384: ES384, Ed25519: EdDSA, RSA: RS256).
    pub alg: Algorithm,
    /// The public key.
    pub key: DecodingKey,
}

impl std::fmt::Debug for JwksKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwksKey({:?})", self.alg)
    }
}

/// The algorithm a JWK signs with: its `alg`, or what its key type implies.
fn jwk_algorithm(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, PublicKeyUse};
    // A key published for another use (encryption) never verifies.
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return None;
    }
    if let Some(alg) = jwk.common.key_algorithm {
        return match alg {
            KeyAlgorithm::ES256 => Some(Algorithm::ES256),
            KeyAlgorithm::ES384 => Some(Algorithm::ES384),
            KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
            KeyAlgorithm::RS256 => Some(Algorithm::RS256),
            KeyAlgorithm::RS384 => Some(Algorithm::RS384),
            KeyAlgorithm::RS512 => Some(Algorithm::RS512),
            KeyAlgorithm::PS256 => Some(Algorithm::PS256),
            KeyAlgorithm::PS384 => Some(Algorithm::PS384),
            KeyAlgorithm::PS512 => Some(Algorithm::PS512),
            // Symmetric and encryption algorithms never verify here.
            _ => None,
        };
    }
    match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            Some(Algorithm::EdDSA)
        }
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        _ => None,
    }
}

/// Fetches JWKS documents over HTTPS with a fixed CA.
pub(crate) struct Fetcher {
    url: hyper::Uri,
    /// The CA bundle, read at each fetch (it may rotate).
    trust: Material,
}

impl Fetcher {
    pub(crate) fn new(url: &str, trust: Material) -> Result<Self, JwksError> {
        let url: hyper::Uri = url.parse().map_err(|e| JwksError::BadUrl(Arc::new(e)))?;
        if url.scheme_str() != Some("https") {
            return Err(JwksError::NotHttps);
        }
        let fetcher = Self { url, trust };
        fetcher.tls()?;
        Ok(fetcher)
    }

    /// A TLS client trusting the bundle as it stands now.
    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, JwksError> {
        let ca_pem = self.trust.ca_pem().map_err(JwksError::Trust)?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca_pem) {
            let c = c.map_err(|e| JwksError::CaPem(Arc::new(e)))?;
            roots.add(c).map_err(JwksError::Ca)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(JwksError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(tls))
    }

    async fn fetch(&self) -> Result<JwkSet, JwksError> {
        let body = self
            .get(&self.url, "application/json", MAX_JWKS_BYTES)
            .await?;
        serde_json::from_slice(&body).map_err(|e| JwksError::NotAJwkSet(Arc::new(e)))
    }

    /// The body of `url` (any URL of an https host, checked against the
    /// same CA bundle), asked for as `accept`, at most `limit` bytes.
    pub(crate) async fn get(
        &self,
        url: &hyper::Uri,
        accept: &str,
        limit: usize,
    ) -> Result<Bytes, JwksError> {
        if url.scheme_str() != Some("https") {
            return Err(JwksError::NotHttps);
        }
        let http = |e: hyper::Error| JwksError::Http(Arc::new(e));
        let host = url.host().ok_or(JwksError::NoHost)?.to_owned();
        let port = url.port_u16().unwrap_or(443);
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| JwksError::Connect {
                host: host.clone(),
                port,
                source: Arc::new(e),
            })?;
        let name =
            ServerName::try_from(host.clone()).map_err(|e| JwksError::ServerName(Arc::new(e)))?;
        let stream = tokio_rustls::TlsConnector::from(self.tls()?)
            .connect(name, tcp)
            .await
            .map_err(|e| JwksError::Handshake(Arc::new(e)))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(http)?;
        tokio::spawn(conn);
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let req = hyper::Request::get(path)
            .header("host", &host)
            .header("accept", accept)
            .body(Empty::<Bytes>::new())
            .map_err(|e| JwksError::Request(Arc::new(e)))?;
        let resp = sender.send_request(req).await.map_err(http)?;
        if !resp.status().is_success() {
            return Err(JwksError::Status(resp.status()));
        }
        Ok(Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| JwksError::Body(Arc::from(e)))?
            .to_bytes())
    }
}

/// The key cache of one issuer.
pub struct Jwks {
    /// `None` for a fixed set given at construction (offline).
    fetcher: Option<Fetcher>,
    keys: std::sync::RwLock<HashMap<String, JwksKey>>,
    /// When the last fetch started, for rate limiting, and why it failed
    /// if it did (said again to callers it holds back).
    last_fetch: Mutex<Option<(Instant, Option<JwksError>)>>,
    min_interval: Duration,
    /// Keys of other algorithms are dropped.
    algorithms: Vec<Algorithm>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.fetcher.as_ref().map(|f| f.url.to_string()))
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

impl Jwks {
    pub(crate) fn new(fetcher: Fetcher, min_interval: Duration, algorithms: &[Algorithm]) -> Self {
        Self {
            fetcher: Some(fetcher),
            keys: std::sync::RwLock::new(HashMap::new()),
            last_fetch: Mutex::new(None),
            min_interval,
            algorithms: algorithms.to_vec(),
        }
    }

    /// Keys fetched from `url` (https only) over TLS trusting only the CAs
    /// of `ca_pem`, refetched for an unknown `kid` at most every
    /// `min_interval`; nothing is fetched until [`Jwks::refresh`].
    pub fn https(
        url: &str,
        ca_pem: Vec<u8>,
        min_interval: Duration,
        algorithms: &[Algorithm],
    ) -> Result<Self, VerifyError> {
        let fetcher = Fetcher::new(
            url,
            Material::Fixed {
                ca_pem,
                identity: None,
            },
        )?;
        Ok(Self::new(fetcher, min_interval, algorithms))
    }

    /// A fixed set of keys from a JWKS document, never refetched (but
    /// see [`Jwks::replace`]).
    pub fn fixed(document: &[u8], algorithms: &[Algorithm]) -> Result<Self, VerifyError> {
        let jwks = Self {
            fetcher: None,
            keys: std::sync::RwLock::new(HashMap::new()),
            last_fetch: Mutex::new(None),
            min_interval: Duration::MAX,
            algorithms: algorithms.to_vec(),
        };
        jwks.replace(document)?;
        Ok(jwks)
    }

    /// Replaces the keys with those of a JWKS document (e.g. one a SPIFFE
    /// Workload API pushed); returns how many are usable. A document that
    /// does not parse changes nothing.
    pub fn replace(&self, document: &[u8]) -> Result<usize, VerifyError> {
        if document.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge.into());
        }
        let set: JwkSet =
            serde_json::from_slice(document).map_err(|e| JwksError::NotAJwkSet(Arc::new(e)))?;
        Ok(self.load(&set))
    }

    /// Replaces the cached keys with the usable ones of `set`; returns how
    /// many there are.
    fn load(&self, set: &JwkSet) -> usize {
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            // Only signature keys of the allowed algorithms are kept.
            let Some(alg) = jwk_algorithm(jwk).filter(|a| self.algorithms.contains(a)) else {
                continue;
            };
            let (Some(kid), Ok(key)) = (jwk.common.key_id.clone(), DecodingKey::from_jwk(jwk))
            else {
                continue;
            };
            keys.insert(kid, JwksKey { alg, key });
        }
        let n = keys.len();
        tracing::debug!(keys = n, "JWKS loaded");
        if let Ok(mut k) = self.keys.write() {
            *k = keys;
        }
        n
    }

    /// What fetches the JWKS, for other documents of the same host;
    /// `None` for a fixed set.
    pub(crate) fn fetcher(&self) -> Option<&Fetcher> {
        self.fetcher.as_ref()
    }

    /// The cached key `kid`.
    pub fn get(&self, kid: &str) -> Option<JwksKey> {
        self.keys.read().ok()?.get(kid).cloned()
    }

    /// Refetches, unless a fetch started within the minimum interval
    /// (`force` skips that check, for the first load); held back after a
    /// failed fetch, it says that failure again.
    pub async fn refresh(&self, force: bool) -> Result<(), VerifyError> {
        let mut last = self.last_fetch.lock().await;
        if let Some((at, failed)) = last.as_ref()
            && !force
            && at.elapsed() < self.min_interval
        {
            return match failed {
                Some(why) => Err(VerifyError::JwksUnavailable(why.clone())),
                None => Ok(()),
            };
        }
        let Some(fetcher) = &self.fetcher else {
            *last = Some((Instant::now(), None));
            return Ok(());
        };
        let started = Instant::now();
        let fetched = match tokio::time::timeout(FETCH_TIMEOUT, fetcher.fetch()).await {
            Ok(r) => r,
            Err(_) => Err(JwksError::TimedOut),
        };
        *last = Some((started, fetched.as_ref().err().cloned()));
        self.load(&fetched?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    /// A document that is no JWK set is refused saying so, with the JSON
    /// error underneath; a failure said again is equal to itself.
    #[test]
    fn a_refused_document_says_why_and_keeps_the_cause() {
        let e = Jwks::fixed(b"{\"keys\": 7}", &[Algorithm::ES256]).unwrap_err();
        let VerifyError::JwksUnavailable(jwks) = &e else {
            panic!("{e:?}");
        };
        assert!(matches!(jwks, JwksError::NotAJwkSet(_)), "{jwks:?}");
        assert!(
            e.to_string()
                .starts_with("JWKS unavailable: JWKS is not a JWK set: "),
            "{e}"
        );
        let under = e.source().and_then(Error::source);
        assert!(
            under.is_some_and(|s| s.is::<Arc<serde_json::Error>>()),
            "{e:?}"
        );
        assert!(e.is_unavailable());
        assert_eq!(e.clone(), e);
        assert_ne!(
            VerifyError::JwksUnavailable(JwksError::TooLarge),
            VerifyError::JwksUnavailable(JwksError::TimedOut)
        );
    }
}
