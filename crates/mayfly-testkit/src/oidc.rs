//! Token issuers the tests run themselves: a key made per test (RSA by
//! `openssl`, ECDSA by rcgen), tokens signed as a Kubernetes API server, a
//! CI OIDC provider or a SPIFFE JWT-SVID issuer would, and the JWKS served
//! over HTTPS from a CA of the test's own.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mayfly_broker::dev::DevCa;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

/// An issuer's signing key and what validators need of it.
pub struct TokenIssuer {
    /// Its `iss`.
    pub iss: String,
    /// The key's id in the JWKS.
    pub kid: String,
    /// The algorithm it signs with.
    pub alg: Algorithm,
    key: EncodingKey,
    jwk: Jwk,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("iss", &self.iss)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl TokenIssuer {
    /// An issuer signing RS256 with a fresh 2048-bit key (as Kubernetes and
    /// most OIDC providers do).
    pub fn rsa(iss: &str, kid: &str) -> Self {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .expect("openssl is installed");
        assert!(out.status.success(), "openssl genpkey failed");
        let key = EncodingKey::from_rsa_pem(&out.stdout).unwrap();
        Self::new(iss, kid, Algorithm::RS256, key)
    }

    /// An issuer signing ES256 with a fresh P-256 key (as SPIRE signs
    /// JWT-SVIDs).
    pub fn ec(iss: &str, kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        Self::new(iss, kid, Algorithm::ES256, key)
    }

    fn new(iss: &str, kid: &str, alg: Algorithm, key: EncodingKey) -> Self {
        let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        Self {
            iss: iss.to_owned(),
            kid: kid.to_owned(),
            alg,
            key,
            jwk,
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Jwk {
        self.jwk.clone()
    }

    /// A JWKS document of these issuers' keys.
    pub fn jwks(issuers: &[&TokenIssuer]) -> String {
        serde_json::to_string(&JwkSet {
            keys: issuers.iter().map(|i| i.jwk()).collect(),
        })
        .unwrap()
    }

    /// `claims` signed with the key, `kid` in the header.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        self.sign_with(&header, claims)
    }

    /// `claims` signed with the key under `header`, as given.
    pub fn sign_with(&self, header: &Header, claims: &Value) -> String {
        jsonwebtoken::encode(header, claims, &self.key).unwrap()
    }
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A JWKS served over HTTPS by a server whose certificate (for
/// `localhost`) a CA of its own signed.
pub struct JwksServer {
    /// `https://localhost:<port>/jwks`.
    pub url: String,
    /// The CA to trust for it (PEM).
    pub ca_pem: String,
    document: Arc<std::sync::Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for JwksServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksServer")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl JwksServer {
    /// Serves `document` at `/jwks`.
    pub async fn start(document: String) -> Self {
        let td = mayfly_core::TrustDomain::new("jwks.test").unwrap();
        let ca = DevCa::generate(&td).unwrap();
        let server = ca
            .issue_server(&["localhost"], std::time::Duration::from_secs(3600))
            .unwrap();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(server.cert_pem.as_bytes())
                .map(Result::unwrap)
                .collect();
        let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let document = Arc::new(std::sync::Mutex::new(document));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (doc, count) = (document.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, doc, count) = (acceptor.clone(), doc.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let (doc, count) = (doc.clone(), count.clone());
                        async move {
                            let body = if req.uri().path() == "/jwks" {
                                count.fetch_add(1, Ordering::SeqCst);
                                doc.lock().unwrap().clone()
                            } else {
                                String::new()
                            };
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            url: format!("https://localhost:{port}/jwks"),
            ca_pem: ca.cert_pem().to_owned(),
            document,
            fetches,
            task,
        }
    }

    /// Serves `document` from now on (a key rotation at the issuer).
    pub fn set(&self, document: String) {
        *self.document.lock().unwrap() = document;
    }

    /// How many times the JWKS was fetched.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
