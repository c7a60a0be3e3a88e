//! rustls configurations for the two ports, on the ring provider, over
//! material ([`LiveTls`]) that is reloaded when its files change.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::config::Tls;
use crate::fsutil::check_private;
use mayfly_core::TrustDomain;
use mayfly_core::svid::parse_svid_leaf;

use crate::identity::DeferredClientVerifier;
use crate::issuer::CaRing;
use crate::reload::{Look, Looks, file_hash};
use crate::shutdown::Shutdown;

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
fn refuse_issuing_ca(
    bundle: &[CertificateDer<'_>],
    issuing_cas: Option<&CaRing>,
    path: &Path,
) -> Result<(), TlsError> {
    let held = |ca: &[u8]| bundle.iter().any(|c| c.as_ref() == ca);
    if let Some(cas) = issuing_cas
        && cas.all().iter().any(|g| held(g.ca.cert_der()))
    {
        return Err(err(
            "trust bundle",
            path,
            "holds the broker's issuing CA ([ca] cert); the bundle is for the CAs of workload \
             SVIDs, and certificates the broker issues are never callers",
        ));
    }
    Ok(())
}

/// Whether the configured bundle holds the issuing CA, for `mayfly config
/// check` (serving checks it in every set it loads). A Workload API's
/// bundle is only known once served, and checked then.
pub fn refuse_issuing_ca_in_bundle(tls: &Tls, issuing_cas: &CaRing) -> Result<(), TlsError> {
    if tls.workload_api.is_some() {
        return Ok(());
    }
    let bundle = certs("trust bundle", &tls.trust_bundle)?;
    refuse_issuing_ca(&bundle, Some(issuing_cas), &tls.trust_bundle)
}

/// What a reload swaps whole: the server's certificate chain with its key,
/// and the verifier of client chains built from the trust bundle.
struct Material {
    key: Arc<CertifiedKey>,
    /// For SVIDs of the broker's trust domain (and any other not below).
    client_chain: Arc<dyn ClientCertVerifier>,
    /// For SVIDs of each federated trust domain: its own bundle only.
    federated: Federated,
}

/// Each federated trust domain with the verifier of its own bundle;
/// `None` while the Workload API has given none for it.
type Federated = Vec<(TrustDomain, Option<Arc<dyn ClientCertVerifier>>)>;

/// Federated bundles as the Workload API gave them: trust domain and CA
/// certificates (DER).
pub type FederatedBundles = Vec<(TrustDomain, Vec<CertificateDer<'static>>)>;

impl Material {
    /// The verifier for a client whose leaf is `leaf`: its trust domain's
    /// bundle if federated, else the broker's own. A federated trust
    /// domain without a bundle refuses every chain (never the broker's
    /// own bundle in its place).
    fn chain_for(
        &self,
        leaf: &CertificateDer<'_>,
    ) -> Result<&Arc<dyn ClientCertVerifier>, rustls::Error> {
        let td = parse_svid_leaf(leaf.as_ref())
            .ok()
            .map(|svid| svid.spiffe_id.trust_domain());
        match td.and_then(|td| self.federated.iter().find(|(f, _)| *f == td)) {
            None => Ok(&self.client_chain),
            Some((_, Some(v))) => Ok(v),
            Some((td, None)) => Err(rustls::Error::General(format!(
                "no bundle for federated trust domain {td} from the SPIFFE Workload API"
            ))),
        }
    }
}

/// A verifier of client chains against the CA certificates of `path`.
fn verifier_from(
    what: &'static str,
    path: &Path,
    certs_: Vec<CertificateDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certs_ {
        roots.add(ca).map_err(|e| err(what, path, e))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| err(what, path, e))
}

/// The verifiers of the federated trust domains' bundles: from each
/// entry's file, or else from `given` (the Workload API's).
fn federated(tls: &Tls, given: &FederatedBundles) -> Result<Federated, TlsError> {
    tls.federated
        .iter()
        .map(|f| {
            let verifier = if f.bundle.as_os_str().is_empty() {
                match given.iter().find(|(td, _)| *td == f.trust_domain) {
                    Some((_, certs)) => Some(verifier_from(
                        "federated bundle",
                        Path::new("(SPIFFE Workload API)"),
                        certs.clone(),
                    )?),
                    None => None,
                }
            } else {
                let bundle = certs("federated bundle", &f.bundle)?;
                Some(verifier_from("federated bundle", &f.bundle, bundle)?)
            };
            Ok((f.trust_domain.clone(), verifier))
        })
        .collect()
}

/// Checks and puts together a set, wherever it came from: a key that
/// matches the chain, a bundle without the issuing CA, and the federated
/// bundles of `files` (or `given` by the Workload API). `key_path` and
/// `bundle_path` name the sources in errors.
fn assemble(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    bundle: Vec<CertificateDer<'static>>,
    (key_path, bundle_path): (&Path, &Path),
    (files, given): (&Tls, &FederatedBundles),
    issuing_cas: Option<&CaRing>,
) -> Result<Material, TlsError> {
    refuse_issuing_ca(&bundle, issuing_cas, bundle_path)?;
    let key = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| err("server key", key_path, e))?;
    Ok(Material {
        key: Arc::new(key),
        client_chain: verifier_from("trust bundle", bundle_path, bundle)?,
        federated: federated(files, given)?,
    })
}

/// Loads and checks the files: the chain, a key (0600) that matches it,
/// and a bundle of at least one CA.
fn material(tls: &Tls, issuing_cas: Option<&CaRing>) -> Result<Material, TlsError> {
    let chain = certs("server certificate", &tls.cert)?;
    check_private(&tls.key).map_err(|e| err("server key", &tls.key, e))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| err("server key", &tls.key, e))?;
    let bundle = certs("trust bundle", &tls.trust_bundle)?;
    assemble(
        chain,
        key,
        bundle,
        (&tls.key, &tls.trust_bundle),
        (tls, &Vec::new()),
        issuing_cas,
    )
}

/// The broker's TLS material as files say now: loaded at start, swapped
/// whole by [`LiveTls::reload`] when they change. Handshakes take the
/// current set; a connection keeps what it was made with.
pub struct LiveTls {
    files: Tls,
    /// `None` until the Workload API has given a first SVID: handshakes
    /// are refused meanwhile.
    current: RwLock<Option<Arc<Material>>>,
    /// The broker's issuing CAs, which no bundle may hold.
    issuing_cas: Option<Arc<CaRing>>,
}

impl std::fmt::Debug for LiveTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTls")
            .field("cert", &self.files.cert)
            .field("trust_bundle", &self.files.trust_bundle)
            .finish_non_exhaustive()
    }
}

impl LiveTls {
    fn current(&self) -> Option<Arc<Material>> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn swap(&self, fresh: Material) {
        let fresh = Some(Arc::new(fresh));
        match self.current.write() {
            Ok(mut g) => *g = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
    }

    /// Loads the files again; only a complete, valid set replaces the
    /// current one, so a half-written or wrong file changes nothing.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.swap(material(&self.files, self.issuing_cas.as_deref())?);
        Ok(())
    }

    /// Takes an SVID (chain, PKCS#8 key, both DER), the bundle of its trust
    /// domain and the federated bundles (DER) the Workload API gave;
    /// refused, the current set kept, if they do not make a valid set.
    pub fn set_svid(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: Vec<u8>,
        bundle: Vec<CertificateDer<'static>>,
        federated: FederatedBundles,
    ) -> Result<(), TlsError> {
        let what = Path::new("(SPIFFE Workload API)");
        self.swap(assemble(
            chain,
            PrivateKeyDer::Pkcs8(key.into()),
            bundle,
            (what, what),
            (&self.files, &federated),
            self.issuing_cas.as_deref(),
        )?);
        Ok(())
    }

    /// The federated trust domains whose bundle comes from the Workload
    /// API (`[[tls.federated]]` without a file).
    pub fn federated_from_api(&self) -> Vec<TrustDomain> {
        self.files
            .federated
            .iter()
            .filter(|f| f.bundle.as_os_str().is_empty())
            .map(|f| f.trust_domain.clone())
            .collect()
    }

    /// The Workload API endpoint the material comes from, if not files.
    pub fn workload_api(&self) -> Option<&str> {
        self.files.workload_api.as_deref()
    }

    /// A hash of each file's bytes (following symlinks, so a Kubernetes
    /// Secret's `..data` swap is a change).
    fn fingerprint(&self) -> Vec<Option<u64>> {
        [&self.files.cert, &self.files.key, &self.files.trust_bundle]
            .into_iter()
            .chain(self.files.federated.iter().map(|f| &f.bundle))
            .map(|p| file_hash(p))
            .collect()
    }
}

impl ResolvesServerCert for LiveTls {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current().map(|m| m.key.clone())
    }
}

fn no_bundle() -> rustls::Error {
    rustls::Error::General("no trust bundle yet from the SPIFFE Workload API".into())
}

/// Checks client chains against the current trust bundle.
#[derive(Debug)]
struct LiveClientChain(Arc<LiveTls>);

impl LiveClientChain {
    /// The current set, or the refusal while there is none yet.
    fn current(&self) -> Result<Arc<Material>, rustls::Error> {
        self.0.current().ok_or_else(no_bundle)
    }
}

impl ClientCertVerifier for LiveClientChain {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle can change under a borrow; no hints (they are
        // optional, and clients present their one SVID anyway).
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()?
            .chain_for(end_entity)?
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()?
            .client_chain
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()?
            .client_chain
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0
            .current()
            .map(|m| m.client_chain.supported_verify_schemes())
            .unwrap_or_default()
    }
}

/// Loaded TLS material and the verifier for client SVIDs.
#[derive(Debug)]
pub struct TlsSetup {
    /// For the gRPC port: requires (and defers checking of) client certificates.
    pub grpc: Arc<rustls::ServerConfig>,
    /// For the HTTP port: client certificates asked for, optional.
    pub http: Arc<rustls::ServerConfig>,
    /// Validates client chains against the current trust bundle.
    pub client_chain: Arc<dyn ClientCertVerifier>,
    /// The material both ports and `client_chain` use, for reloads.
    pub live: Arc<LiveTls>,
}

/// Loads the server certificate, key and trust bundle (none yet from the
/// Workload API); no bundle, now or reloaded, may hold one of
/// `issuing_cas`.
pub fn load(tls: &Tls, issuing_cas: Option<Arc<CaRing>>) -> Result<TlsSetup, TlsError> {
    // From the Workload API, the material comes with its first update.
    let first = match tls.workload_api {
        Some(_) => None,
        None => Some(Arc::new(material(tls, issuing_cas.as_deref())?)),
    };
    let live = Arc::new(LiveTls {
        current: RwLock::new(first),
        files: tls.clone(),
        issuing_cas,
    });
    let client_chain: Arc<dyn ClientCertVerifier> = Arc::new(LiveClientChain(live.clone()));
    let provider = provider();
    let builder = || {
        rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| err("TLS", &tls.cert, e))
    };
    let mut grpc = builder()?
        .with_client_cert_verifier(Arc::new(DeferredClientVerifier::new(client_chain.clone())))
        .with_cert_resolver(live.clone());
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    // Client certificates are asked for but optional: JWKS and health need
    // none; `/introspect` requires one.
    let mut http = builder()?
        .with_client_cert_verifier(Arc::new(DeferredClientVerifier::new(client_chain.clone())))
        .with_cert_resolver(live.clone());
    http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsSetup {
        grpc: Arc::new(grpc),
        http: Arc::new(http),
        client_chain,
        live,
    })
}

/// Reloads the TLS material on SIGHUP or when a file changes, until
/// `stop`; an invalid set is refused with a log line and the old one kept.
pub async fn watch_and_reload(live: Arc<LiveTls>, interval: Duration, stop: Shutdown) {
    let mut seen = live.fingerprint();
    let mut looks = Looks::new(interval, stop);
    while let Some(look) = looks.next().await {
        let now = live.fingerprint();
        if look == Look::Due && now == seen {
            continue;
        }
        seen = now;
        match live.reload() {
            Ok(()) => tracing::info!(
                cert = %live.files.cert.display(),
                trust_bundle = %live.files.trust_bundle.display(),
                "TLS material reloaded; new handshakes use it"
            ),
            Err(e) => tracing::error!(
                error = %e,
                "TLS reload refused; the previous certificate, key and trust bundle stay in use"
            ),
        }
    }
}
