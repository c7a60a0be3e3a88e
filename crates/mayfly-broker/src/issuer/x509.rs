//! Task-bound X.509-SVIDs signed from agents' CSRs, and the CRL.
//!
//! CSR intake keeps only the request's public key, after checking the
//! request's self-signature and the key's type and size; everything else the
//! CSR asks for (subject, SANs, CA:true, other extensions) is ignored. The
//! leaf is built from scratch: one URI SAN `<agent>/task/<task_id>`,
//! CA:false, key usage digitalSignature (critical), EKU serverAuth and
//! clientAuth, a random 127-bit serial, and a CRL Distribution Point (the
//! broker's `/crl`) so that stock TLS stacks find the CRL.

use std::path::Path;

use mayfly_core::{RevocationReason, SpiffeId, Timestamp};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CrlDistributionPoint,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use zeroize::Zeroizing;

use crate::fsutil::check_private;

pub use mayfly_core::limits::MAX_CSR_BYTES;
/// Smallest RSA key accepted.
pub const MIN_RSA_BITS: usize = 2048;
/// How far not-before is backdated, for clock skew.
pub const BACKDATE: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a CSR is refused. Each says what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// Empty input.
    #[error("csr is empty")]
    Empty,
    /// Larger than [`MAX_CSR_BYTES`].
    #[error("csr is {0} bytes; at most {MAX_CSR_BYTES} are accepted")]
    TooLarge(usize),
    /// Not a PKCS#10 request in PEM or DER.
    #[error("csr is not a PKCS#10 certificate request in PEM or DER: {0}")]
    Malformed(String),
    /// The self-signature does not verify.
    #[error("csr signature does not verify against its own public key")]
    BadSignature,
    /// Signed with an algorithm outside the allow-list (e.g. SHA-1).
    #[error(
        "csr is signed with an unsupported or weak algorithm {0}; use SHA-256 or better, or Ed25519"
    )]
    WeakSignature(String),
    /// RSA key below [`MIN_RSA_BITS`].
    #[error("csr has a {0}-bit RSA key; at least {MIN_RSA_BITS} bits are required")]
    RsaTooSmall(usize),
    /// Another key type or curve.
    #[error(
        "csr key type {0} is not supported; use ECDSA P-256 or P-384, Ed25519, or RSA >= 2048 bits"
    )]
    UnsupportedKey(String),
}

/// The one thing taken from a CSR: its public key (SPKI DER), after checks.
#[derive(Clone, PartialEq, Eq)]
pub struct CsrKey {
    /// SubjectPublicKeyInfo, DER.
    spki: Vec<u8>,
    /// For logs: "ECDSA P-256", "RSA 3072", …
    kind: String,
}

impl std::fmt::Debug for CsrKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CsrKey({})", self.kind)
    }
}

impl CsrKey {
    /// The key type, e.g. "ECDSA P-256".
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The SubjectPublicKeyInfo, DER.
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }
}

/// Parses and checks a PEM or DER CSR.
pub fn parse_csr(input: &[u8]) -> Result<CsrKey, CsrError> {
    if input.is_empty() {
        return Err(CsrError::Empty);
    }
    if input.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(input.len()));
    }
    let der = if input.trim_ascii_start().starts_with(b"-----BEGIN") {
        let (_, pem) = x509_parser::pem::parse_x509_pem(input.trim_ascii_start())
            .map_err(|e| CsrError::Malformed(format!("bad PEM: {e}")))?;
        if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
            return Err(CsrError::Malformed(format!(
                "PEM block is {:?}, expected \"CERTIFICATE REQUEST\"",
                pem.label
            )));
        }
        pem.contents
    } else {
        input.to_vec()
    };
    let (rest, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(
            "trailing bytes after the request".into(),
        ));
    }
    let sig = &csr.signature_algorithm.algorithm;
    let allowed = [
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_PKCS1_RSASSAPSS,
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_SIG_ED25519,
    ];
    if !allowed.contains(sig) {
        return Err(CsrError::WeakSignature(sig.to_id_string()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let alg = &spki.algorithm.algorithm;
    let kind = if *alg == OID_PKCS1_RSAENCRYPTION {
        match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => {
                let bits = rsa.key_size();
                if bits < MIN_RSA_BITS {
                    return Err(CsrError::RsaTooSmall(bits));
                }
                if bits > 8192 {
                    return Err(CsrError::UnsupportedKey(format!("RSA {bits}")));
                }
                format!("RSA {bits}")
            }
            _ => return Err(CsrError::Malformed("bad RSA public key".into())),
        }
    } else if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => "ECDSA P-256".to_owned(),
            Some(c) if c == OID_NIST_EC_P384 => "ECDSA P-384".to_owned(),
            Some(c) => {
                return Err(CsrError::UnsupportedKey(format!(
                    "EC curve {}",
                    c.to_id_string()
                )));
            }
            None => {
                return Err(CsrError::UnsupportedKey(
                    "EC key without a named curve".into(),
                ));
            }
        }
    } else if *alg == OID_SIG_ED25519 {
        "Ed25519".to_owned()
    } else {
        return Err(CsrError::UnsupportedKey(alg.to_id_string()));
    };
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    Ok(CsrKey {
        spki: spki.raw.to_vec(),
        kind,
    })
}

/// Why the issuing CA could not be loaded or could not sign.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A file could not be read, or the key is readable by others.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate or key is unusable.
    #[error("issuing CA: {0}")]
    Invalid(String),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// A random positive serial of 16 bytes (at least 120 random bits) with
/// a minimal DER encoding, and its upper-case hex as `openssl` prints it.
pub fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    #[allow(clippy::expect_used)]
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random number generator failed");
    // Positive, and no leading zero byte (so the INTEGER is minimal).
    bytes[0] &= 0x7f;
    if bytes[0] == 0 {
        bytes[0] = 0x01;
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
    (SerialNumber::from_slice(&bytes), hex)
}

/// The serial number whose upper-case hex [`random_serial`] gave.
pub(crate) fn serial_from_hex(hex: &str) -> Result<SerialNumber, CaError> {
    hex_bytes(hex)
        .map(|b| SerialNumber::from_slice(&b))
        .ok_or_else(|| CaError::Invalid(format!("bad serial {hex:?}")))
}

fn offset(t: Timestamp) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A certificate revoked before its expiry, for the CRL.
#[derive(Debug, Clone)]
pub struct RevokedCert {
    /// Upper-case hex serial.
    pub serial: String,
    /// When it was revoked.
    pub at: Timestamp,
    /// Why.
    pub reason: RevocationReason,
}

/// The broker's issuing CA: an intermediate (CA:true, keyCertSign, cRLSign,
/// URI SAN `spiffe://<trust domain>`).
pub struct IssuingCa {
    issuer: Issuer<'static, KeyPair>,
    /// The issuing CA certificate and any intermediates above it, PEM.
    chain_pem: String,
    /// The issuing CA certificate alone, DER: the edge refuses every client
    /// certificate it signed.
    cert_der: Vec<u8>,
    /// The first 8 bytes of the certificate's SHA-256, hex: names the CA in
    /// leases and in its CRL's URL.
    id: String,
    /// Where the CRL is published (the broker's `/crl`), named in every
    /// leaf; `None` names nowhere.
    crl_url: Option<String>,
}

impl std::fmt::Debug for IssuingCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IssuingCa({})", self.id)
    }
}

impl IssuingCa {
    /// Loads the CA certificate (first PEM block of `cert`, followed by any
    /// intermediates) and its key (mode 0600).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, CaError> {
        let io = |p: &Path| {
            let path = p.display().to_string();
            move |source| CaError::Io { path, source }
        };
        check_private(key).map_err(io(key))?;
        let chain_pem = std::fs::read_to_string(cert).map_err(io(cert))?;
        let key_pem = Zeroizing::new(std::fs::read_to_string(key).map_err(io(key))?);
        Self::from_pem(&chain_pem, &key_pem)
    }

    /// From PEM text.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        use rcgen::PublicKeyData;
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Invalid(format!("key: {e}")))?;
        let first = chain_pem
            .find("-----END CERTIFICATE-----")
            .map(|i| &chain_pem[..i + "-----END CERTIFICATE-----".len()])
            .ok_or_else(|| CaError::Invalid("no certificate in the CA file".into()))?;
        let issuer = Issuer::from_ca_cert_pem(first, key)
            .map_err(|e| CaError::Invalid(format!("certificate: {e}")))?;
        let cert_der = {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::CertificateDer::from_pem_slice(first.as_bytes())
                .map_err(|e| CaError::Invalid(format!("certificate: {e}")))?
                .to_vec()
        };
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&cert_der)
            .map_err(|e| CaError::Invalid(format!("certificate: {e}")))?;
        if parsed.tbs_certificate.subject_pki.raw != issuer.key().subject_public_key_info() {
            return Err(CaError::Invalid(
                "the key is not the CA certificate's key".into(),
            ));
        }
        let usages = issuer.key_usages();
        let can_sign = usages.contains(&KeyUsagePurpose::KeyCertSign)
            && usages.contains(&KeyUsagePurpose::CrlSign);
        if !usages.is_empty() && !can_sign {
            return Err(CaError::Invalid(
                "the CA certificate must allow keyCertSign and cRLSign".into(),
            ));
        }
        let id = ca_id(&cert_der);
        Ok(Self {
            issuer,
            chain_pem: chain_pem.trim_end().to_owned() + "\n",
            cert_der,
            id,
            crl_url: None,
        })
    }

    /// Names `url` as the CRL Distribution Point of every leaf it signs.
    #[must_use]
    pub fn with_crl_url(mut self, url: String) -> Self {
        self.crl_url = Some(url);
        self
    }

    /// Its id: the first 8 bytes of its certificate's SHA-256, hex.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The issuing CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The chain to hand out with leaves (issuing CA first).
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// Signs a task-bound X.509-SVID for `id` over `key`.
    pub fn sign_svid(
        &self,
        key: &CsrKey,
        id: &SpiffeId,
        not_before: Timestamp,
        not_after: Timestamp,
        serial: SerialNumber,
    ) -> Result<String, CaError> {
        let spki = rcgen::SubjectPublicKeyInfo::from_der(&key.spki)
            .map_err(|e| CaError::Invalid(format!("public key: {e}")))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Mayfly task");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(serial);
        params.not_before = offset(not_before);
        params.not_after = offset(not_after);
        params.use_authority_key_identifier_extension = true;
        if let Some(url) = &self.crl_url {
            params.crl_distribution_points = vec![CrlDistributionPoint {
                uris: vec![url.clone()],
            }];
        }
        Ok(params.signed_by(&spki, &self.issuer)?.pem())
    }

    /// A DER CRL of `revoked`, valid from `now` until `next_update`.
    pub fn crl(
        &self,
        revoked: &[RevokedCert],
        crl_number: u64,
        now: Timestamp,
        next_update: Timestamp,
    ) -> Result<Vec<u8>, CaError> {
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                let bytes = hex_bytes(&r.serial)
                    .ok_or_else(|| CaError::Invalid(format!("bad serial {:?}", r.serial)))?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: offset(r.at),
                    reason_code: Some(crl_reason(r.reason)),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, CaError>>()?;
        let params = CertificateRevocationListParams {
            this_update: offset(now),
            next_update: offset(next_update),
            crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.der().to_vec())
    }
}

/// A CA's id: the first 8 bytes of its certificate's SHA-256, hex.
pub(crate) fn ca_id(cert_der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, cert_der).as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hex_bytes(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// RFC 5280 reason codes for Mayfly's revocation reasons.
fn crl_reason(r: RevocationReason) -> rcgen::RevocationReason {
    use rcgen::RevocationReason as Crl;
    match r {
        RevocationReason::TaskCompleted
        | RevocationReason::TaskRevoked
        | RevocationReason::ParentRevoked => Crl::CessationOfOperation,
        RevocationReason::ContextChanged | RevocationReason::AgentRevoked => {
            Crl::PrivilegeWithdrawn
        }
        RevocationReason::Operator | RevocationReason::TokenRevoked => Crl::Unspecified,
    }
}

/// The parameters of an issuing CA for `td`: CA:true (path length 0),
/// keyCertSign and cRLSign, URI SAN `spiffe://td`.
pub fn issuing_ca_params(
    td: &mayfly_core::TrustDomain,
    valid_for: std::time::Duration,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Mayfly");
    dn.push(DnType::CommonName, format!("Mayfly issuing CA for {td}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(td.id_string().as_str().try_into()?)];
    params.serial_number = Some(random_serial().0);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + valid_for;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_positive_minimal_and_hex() {
        for _ in 0..200 {
            let (s, hex) = random_serial();
            let bytes = s.to_bytes();
            assert_eq!(bytes.len(), 16);
            assert!(bytes[0] >= 1 && bytes[0] <= 0x7f);
            assert_eq!(hex_bytes(&hex).unwrap(), bytes);
            assert_eq!(serial_from_hex(&hex).unwrap(), s);
            assert_eq!(hex, hex.to_uppercase());
        }
    }

    #[test]
    fn a_ca_key_must_be_its_certificates_key() {
        let td = mayfly_core::TrustDomain::new("example.org").unwrap();
        let params = issuing_ca_params(&td, std::time::Duration::from_secs(60)).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.self_signed(&key).unwrap().pem();
        let ca = IssuingCa::from_pem(&cert, &key.serialize_pem()).unwrap();
        assert_eq!(ca.id().len(), 16);
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let e = IssuingCa::from_pem(&cert, &other.serialize_pem()).unwrap_err();
        assert!(
            e.to_string().contains("not the CA certificate's key"),
            "{e}"
        );
    }

    #[test]
    fn rejects_garbage_and_size() {
        assert_eq!(parse_csr(b""), Err(CsrError::Empty));
        assert!(matches!(parse_csr(b"hello"), Err(CsrError::Malformed(_))));
        assert!(matches!(
            parse_csr(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            Err(CsrError::Malformed(_))
        ));
        assert_eq!(
            parse_csr(&vec![b'A'; MAX_CSR_BYTES + 1]),
            Err(CsrError::TooLarge(MAX_CSR_BYTES + 1))
        );
    }

    #[test]
    fn accepts_a_p256_csr_and_keeps_only_its_key() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["evil.example.com".into()]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap();
        let parsed = parse_csr(csr.pem().unwrap().as_bytes()).unwrap();
        assert_eq!(parsed.kind(), "ECDSA P-256");
        use rcgen::PublicKeyData;
        assert_eq!(parsed.spki, key.subject_public_key_info());
        let der = parse_csr(csr.der()).unwrap();
        assert_eq!(der.spki, parsed.spki);
        // A flipped bit in the signature.
        let mut bad = csr.der().to_vec();
        let last = bad.len() - 3;
        bad[last] ^= 0x01;
        assert_eq!(parse_csr(&bad), Err(CsrError::BadSignature));
    }
}
