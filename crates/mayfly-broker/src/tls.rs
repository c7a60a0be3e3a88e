//! rustls configurations for the two ports, on the ring provider.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Tls;
use crate::fsutil::check_private;
use crate::identity::DeferredClientVerifier;

/// Why TLS material is unusable.
#[derive(Debug, thiserror::Error)]
#[error("{what} ({path}): {reason}")]
pub struct TlsError {
    what: &'static str,
    path: String,
    reason: String,
}

fn err(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError {
        what,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The process's one crypto provider.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(what, path, e))?;
    if certs.is_empty() {
        return Err(err(what, path, "no PEM certificates found"));
    }
    Ok(certs)
}

/// Refuses a trust bundle that holds the issuing CA itself: clients must
/// chain to the workload CA, and a bundle that trusts the task CA directly
/// says someone mixed the two up (task certificates are refused as callers
/// either way).
pub fn refuse_issuing_ca_in_bundle(tls: &Tls, issuing_ca_der: &[u8]) -> Result<(), TlsError> {
    if certs("trust bundle", &tls.trust_bundle)?
        .iter()
        .any(|c| c.as_ref() == issuing_ca_der)
    {
        return Err(err(
            "trust bundle",
            &tls.trust_bundle,
            "holds the broker's issuing CA ([ca] cert); the bundle is for the CAs of workload \
             SVIDs, and certificates the broker issues are never callers",
        ));
    }
    Ok(())
}

/// Loaded TLS material and the verifier for client SVIDs.
#[derive(Debug)]
pub struct TlsSetup {
    /// For the gRPC port: requires (and defers checking of) client certificates.
    pub grpc: Arc<rustls::ServerConfig>,
    /// For the HTTP port: no client certificates.
    pub http: Arc<rustls::ServerConfig>,
    /// Validates client chains against the trust bundle.
    pub client_chain: Arc<dyn ClientCertVerifier>,
}

/// Loads the server certificate, key and trust bundle.
pub fn load(tls: &Tls) -> Result<TlsSetup, TlsError> {
    let chain = certs("server certificate", &tls.cert)?;
    check_private(&tls.key).map_err(|e| err("server key", &tls.key, e))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| err("server key", &tls.key, e))?;
    let mut roots = RootCertStore::empty();
    for ca in certs("trust bundle", &tls.trust_bundle)? {
        roots
            .add(ca)
            .map_err(|e| err("trust bundle", &tls.trust_bundle, e))?;
    }
    let provider = provider();
    let client_chain =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| err("trust bundle", &tls.trust_bundle, e))?;

    let builder = || {
        rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| err("TLS", &tls.cert, e))
    };
    let mut grpc = builder()?
        .with_client_cert_verifier(Arc::new(DeferredClientVerifier::new(client_chain.clone())))
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| err("server certificate", &tls.cert, e))?;
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    // Client certificates are asked for but optional: JWKS and health need
    // none; `/introspect` requires one.
    let mut http = builder()?
        .with_client_cert_verifier(Arc::new(DeferredClientVerifier::new(client_chain.clone())))
        .with_single_cert(chain, key)
        .map_err(|e| err("server certificate", &tls.cert, e))?;
    http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsSetup {
        grpc: Arc::new(grpc),
        http: Arc::new(http),
        client_chain,
    })
}
