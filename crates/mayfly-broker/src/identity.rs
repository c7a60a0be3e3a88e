//! Who is calling: the X.509-SVID of the mTLS peer, turned into a typed
//! [`Caller`] once per connection, right after the handshake.
//!
//! The TLS layer ([`DeferredClientVerifier`]) asks for a client certificate
//! and checks the handshake signature (the peer holds the key), but leaves
//! the chain and SPIFFE checks to [`Authenticator::authenticate`], which runs
//! before any request on the connection is served. A connection that fails
//! them still completes TLS, so every RPC on it can be answered with
//! `UNAUTHENTICATED` and a message that says what was wrong, instead of an
//! opaque handshake failure.
//!
//! A certificate the broker issued for a task is a credential for
//! downstream services, never an identity towards the broker: a SPIFFE ID
//! with the reserved `task` segment is refused, and so is any leaf the
//! broker's issuing CA signed, whatever its SAN says (two independent
//! checks, so neither a policy nor a CA mix-up can turn one into a caller).

use std::sync::Arc;

use crate::issuer::CaRing;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mayfly_core::svid::{LeafError, parse_svid_leaf};
use mayfly_core::{Proof, SpiffeId, SpiffeIdError, Timestamp, TrustDomain};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

/// An authenticated caller: an agent or operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The SPIFFE ID from the client certificate, or mapped from the
    /// workload token.
    pub id: SpiffeId,
    /// How it was proven.
    pub proof: Proof,
    /// The client certificate's RFC 8705 `x5t#S256` (for token binding);
    /// `None` for a caller proven by a workload token.
    thumbprint: Option<String>,
    /// The certificate's notAfter (or the token's `exp`): a connection
    /// outliving it is refused from then on.
    pub not_after: Timestamp,
}

impl Caller {
    /// A caller proven by a client certificate (`thumbprint` its
    /// `x5t#S256`).
    pub fn by_certificate(id: SpiffeId, thumbprint: String, not_after: Timestamp) -> Self {
        Self {
            id,
            proof: Proof::Certificate,
            thumbprint: Some(thumbprint),
            not_after,
        }
    }

    /// A caller proven by a workload token of `issuer`.
    pub fn by_token(id: SpiffeId, issuer: String, not_after: Timestamp) -> Self {
        Self {
            id,
            proof: Proof::Token { issuer },
            thumbprint: None,
            not_after,
        }
    }

    /// The `x5t#S256` of the client certificate, if the caller has one.
    pub fn cert_thumbprint(&self) -> Option<&str> {
        self.thumbprint.as_deref()
    }

    /// An audit record of `event` asked by this caller, naming the
    /// workload-token issuer if that is how it was proven.
    pub fn record(&self, event: mayfly_audit::Event) -> mayfly_audit::AuditRecord {
        let mut r = mayfly_audit::AuditRecord::new(event, &self.id);
        r.authenticated_by = self.proof.token_issuer().map(str::to_owned);
        r
    }
}

/// Why a peer is not an acceptable caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No client certificate was presented.
    #[error("no client certificate: present an X.509-SVID from this trust domain")]
    NoCertificate,
    /// A workload token was presented instead, and refused.
    #[error("{0}")]
    Token(crate::federation::TokenError),
    /// The chain does not lead to the trust bundle.
    #[error("client certificate is not issued by a CA in the broker's trust bundle")]
    UnknownIssuer,
    /// The certificate (or one in its chain) has expired.
    #[error("client certificate has expired")]
    Expired,
    /// The certificate is not valid yet.
    #[error("client certificate is not valid yet")]
    NotYetValid,
    /// Another chain-validation failure.
    #[error("client certificate rejected: {0}")]
    Invalid(String),
    /// The certificate does not parse.
    #[error("client certificate cannot be parsed: {0}")]
    Malformed(String),
    /// The leaf is a CA certificate.
    #[error("client certificate is a CA certificate; an X.509-SVID must be a leaf (CA:false)")]
    LeafIsCa,
    /// The leaf may sign certificates or CRLs.
    #[error(
        "client certificate has key usage keyCertSign or cRLSign, which an X.509-SVID must not have"
    )]
    SigningKeyUsage,
    /// No URI SAN.
    #[error("client certificate has no URI SAN; an X.509-SVID carries exactly one spiffe:// URI")]
    NoUriSan,
    /// More than one URI SAN.
    #[error("client certificate has {0} URI SANs; an X.509-SVID carries exactly one")]
    ManyUriSans(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("client certificate URI SAN {uri} is not a SPIFFE ID: {reason}")]
    NotSpiffe {
        /// The URI, quoted.
        uri: String,
        /// Why.
        #[source]
        reason: SpiffeIdError,
    },
    /// The SPIFFE ID has the segment reserved for task certificates.
    #[error(
        "client certificate {0} is a task certificate (its SPIFFE ID has a `task` segment); \
         task certificates are credentials for downstream services, never an identity \
         towards Mayfly: connect with the workload's own X.509-SVID"
    )]
    TaskCertificate(SpiffeId),
    /// The leaf was signed by the broker's own issuing CA.
    #[error(
        "client certificate was issued by this broker's task CA; task certificates are \
         credentials for downstream services, never an identity towards Mayfly: connect \
         with the workload's own X.509-SVID"
    )]
    IssuedByBroker,
    /// The SPIFFE ID belongs to another trust domain.
    #[error("client SPIFFE ID {id} is not in trust domain {expected}")]
    WrongTrustDomain {
        /// The presented ID.
        id: SpiffeId,
        /// The broker's trust domain.
        expected: TrustDomain,
    },
}

/// Requests a client certificate and verifies the handshake signature, but
/// defers chain validation to [`Authenticator`] (see the module docs).
#[derive(Debug)]
pub struct DeferredClientVerifier {
    /// The standard WebPKI verifier for the trust bundle: used here for root
    /// hints and signature checks.
    inner: Arc<dyn ClientCertVerifier>,
}

impl DeferredClientVerifier {
    /// Wraps the bundle's WebPKI verifier.
    pub fn new(inner: Arc<dyn ClientCertVerifier>) -> Self {
        Self { inner }
    }
}

impl ClientCertVerifier for DeferredClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Deferred: `Authenticator::authenticate` validates the chain before
        // any request on this connection is served.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Turns a peer's certificate chain into a [`Caller`].
#[derive(Debug, Clone)]
pub struct Authenticator {
    /// Validates the chain against the trust bundle (signatures, validity,
    /// client-auth EKU).
    chain: Arc<dyn ClientCertVerifier>,
    /// Callers must belong to it, or to one of `federated`.
    trust_domain: TrustDomain,
    /// Federated trust domains whose SVIDs are accepted (each checked
    /// against its own bundle by `chain`).
    federated: Vec<TrustDomain>,
    /// The broker's issuing CAs, when it has them: a leaf any of them
    /// signed is a task certificate and never a caller.
    issuing_cas: Option<Arc<CaRing>>,
}

impl From<LeafError> for AuthError {
    fn from(e: LeafError) -> Self {
        match e {
            LeafError::IsCa => Self::LeafIsCa,
            LeafError::SigningKeyUsage => Self::SigningKeyUsage,
            LeafError::UriSans(0) => Self::NoUriSan,
            LeafError::UriSans(n) => Self::ManyUriSans(n),
            LeafError::NotSpiffe { uri, reason } => Self::NotSpiffe { uri, reason },
            LeafError::Malformed(m) => Self::Malformed(m),
            // A rule added to the shared check: named as it says.
            other => Self::Invalid(other.to_string()),
        }
    }
}

impl Authenticator {
    /// An authenticator for `trust_domain` using the bundle's verifier.
    pub fn new(chain: Arc<dyn ClientCertVerifier>, trust_domain: TrustDomain) -> Self {
        Self {
            chain,
            trust_domain,
            federated: Vec::new(),
            issuing_cas: None,
        }
    }

    /// Also accepts SVIDs of these trust domains (`[[tls.federated]]`);
    /// `chain` checks each against its own trust domain's bundle.
    pub fn with_federated(mut self, trust_domains: Vec<TrustDomain>) -> Self {
        self.federated = trust_domains;
        self
    }

    /// Also refuses every leaf signed by any of the broker's issuing CAs,
    /// as the ring holds them at each call.
    pub fn refusing_issued_by(mut self, cas: Arc<CaRing>) -> Self {
        self.issuing_cas = Some(cas);
        self
    }

    /// Validates the peer chain (leaf first) as an X.509-SVID of the trust
    /// domain.
    pub fn authenticate(&self, peer: Option<&[CertificateDer<'_>]>) -> Result<Caller, AuthError> {
        let (leaf, intermediates) = match peer {
            Some([leaf, rest @ ..]) => (leaf, rest),
            _ => return Err(AuthError::NoCertificate),
        };
        // Shape first (so a CA or SAN-less certificate is named as such),
        // then trust, then membership.
        let svid = parse_svid_leaf(leaf.as_ref())?;
        let (id, leaf_not_after) = (svid.spiffe_id, svid.not_after);
        if id.is_task_bound() {
            return Err(AuthError::TaskCertificate(id));
        }
        if let Some(cas) = &self.issuing_cas
            && cas.all().iter().any(|g| signed_by(leaf, g.ca.cert_der()))
        {
            return Err(AuthError::IssuedByBroker);
        }
        self.chain
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(chain_error)?;
        // The connection is good until the first certificate of the chain
        // expires.
        let not_after = intermediates
            .iter()
            .filter_map(|c| X509Certificate::from_der(c.as_ref()).ok())
            .map(|(_, c)| {
                Timestamp::from_secs(u64::try_from(c.validity().not_after.timestamp()).unwrap_or(0))
            })
            .fold(leaf_not_after, Timestamp::min);
        if !id.is_member_of(&self.trust_domain)
            && !self.federated.iter().any(|td| id.is_member_of(td))
        {
            return Err(AuthError::WrongTrustDomain {
                id,
                expected: self.trust_domain.clone(),
            });
        }
        Ok(Caller::by_certificate(id, thumbprint(leaf), not_after))
    }
}

/// Whether `leaf`'s signature verifies with the public key of the CA
/// certificate `ca` (both DER); anything unparsable is "no".
fn signed_by(leaf: &CertificateDer<'_>, ca: &[u8]) -> bool {
    let (Ok((_, leaf)), Ok((_, ca))) = (
        X509Certificate::from_der(leaf.as_ref()),
        X509Certificate::from_der(ca),
    ) else {
        return false;
    };
    leaf.tbs_certificate.issuer == ca.tbs_certificate.subject
        && leaf.verify_signature(Some(ca.public_key())).is_ok()
}

fn chain_error(e: rustls::Error) -> AuthError {
    match e {
        rustls::Error::InvalidCertificate(ce) => match ce {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                AuthError::UnknownIssuer
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                AuthError::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                AuthError::NotYetValid
            }
            CertificateError::BadEncoding => AuthError::Malformed("bad DER encoding".into()),
            other => AuthError::Invalid(rustls::Error::InvalidCertificate(other).to_string()),
        },
        other => AuthError::Invalid(other.to_string()),
    }
}

/// RFC 8705 `x5t#S256`: base64url (no padding) of SHA-256 over the DER.
pub fn thumbprint(cert: &CertificateDer<'_>) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, cert.as_ref()))
}
