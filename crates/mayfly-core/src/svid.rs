//! The X.509-SVID leaf rules (SPIFFE X509-SVID §4, §5), checked the same
//! way wherever Mayfly reads a certificate: the broker's edge and
//! mayfly-verify's task certificates. A leaf: not a CA, no keyCertSign or
//! cRLSign key usage, exactly one URI SAN, a SPIFFE ID. The chain and the
//! trust domain are each caller's to check.

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::{SpiffeId, SpiffeIdError, Timestamp};

/// What an X.509-SVID leaf says, once its form is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidLeaf {
    /// The one URI SAN.
    pub spiffe_id: SpiffeId,
    /// The end of its validity.
    pub not_after: Timestamp,
    /// Its serial number, upper-case hex without leading zero bytes, as
    /// the revocation feed and `openssl` print it.
    pub serial: String,
}

/// Why a certificate is not an X.509-SVID leaf.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeafError {
    /// Not a DER X.509 certificate, or an extension does not parse.
    #[error("cannot be parsed: {0}")]
    Malformed(String),
    /// A CA certificate.
    #[error("is a CA certificate; an X.509-SVID must be a leaf (CA:false)")]
    IsCa,
    /// May sign certificates or CRLs.
    #[error("has key usage keyCertSign or cRLSign, which an X.509-SVID must not have")]
    SigningKeyUsage,
    /// Not exactly one URI SAN.
    #[error("has {0} URI SANs; an X.509-SVID carries exactly one spiffe:// URI")]
    UriSans(usize),
    /// The URI SAN is not a SPIFFE ID.
    #[error("URI SAN {uri} is not a SPIFFE ID: {reason}")]
    NotSpiffe {
        /// The URI, quoted and cut to 128 characters.
        uri: String,
        /// Why.
        reason: SpiffeIdError,
    },
}

/// Checks `der` as an X.509-SVID leaf and reads it. Not the signature or
/// the chain.
pub fn parse_svid_leaf(der: &[u8]) -> Result<SvidLeaf, LeafError> {
    let malformed = |e: &dyn std::fmt::Display| LeafError::Malformed(e.to_string());
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| malformed(&e))?;
    let bc = cert.basic_constraints().map_err(|e| malformed(&e))?;
    if bc.is_some_and(|b| b.value.ca) {
        return Err(LeafError::IsCa);
    }
    let ku = cert.key_usage().map_err(|e| malformed(&e))?;
    if ku.is_some_and(|k| k.value.key_cert_sign() || k.value.crl_sign()) {
        return Err(LeafError::SigningKeyUsage);
    }
    let san = cert.subject_alternative_name().map_err(|e| malformed(&e))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(LeafError::UriSans(uris.len()));
    };
    let spiffe_id = SpiffeId::new(uri).map_err(|reason| LeafError::NotSpiffe {
        uri: format!("{:?}", uri.chars().take(128).collect::<String>()),
        reason,
    })?;
    let not_after =
        Timestamp::from_secs(u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0));
    let serial = cert
        .raw_serial()
        .iter()
        .skip_while(|b| **b == 0)
        .map(|b| format!("{b:02X}"))
        .collect();
    Ok(SvidLeaf {
        spiffe_id,
        not_after,
        serial,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rcgen::{
        BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    };

    use super::*;

    fn cert(f: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://example.org/agent/demo".try_into().unwrap(),
        )];
        p.serial_number = Some(SerialNumber::from_slice(&[0, 0x0a, 0xbc]));
        f(&mut p);
        p.self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn an_svid_leaf_is_read() {
        let leaf = parse_svid_leaf(&cert(|_| {})).unwrap();
        assert_eq!(leaf.spiffe_id.as_str(), "spiffe://example.org/agent/demo");
        assert_eq!(leaf.serial, "0ABC");
    }

    #[test]
    fn what_an_svid_leaf_may_not_be_is_named() {
        let ca = cert(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
        assert_eq!(parse_svid_leaf(&ca), Err(LeafError::IsCa));
        let signs = cert(|p| p.key_usages = vec![KeyUsagePurpose::KeyCertSign]);
        assert_eq!(parse_svid_leaf(&signs), Err(LeafError::SigningKeyUsage));
        let crl = cert(|p| p.key_usages = vec![KeyUsagePurpose::CrlSign]);
        assert_eq!(parse_svid_leaf(&crl), Err(LeafError::SigningKeyUsage));
        let two = cert(|p| {
            p.subject_alt_names
                .push(SanType::URI("spiffe://example.org/b".try_into().unwrap()))
        });
        assert_eq!(parse_svid_leaf(&two), Err(LeafError::UriSans(2)));
        let none = cert(|p| p.subject_alt_names.clear());
        assert_eq!(parse_svid_leaf(&none), Err(LeafError::UriSans(0)));
        let http = cert(|p| {
            p.subject_alt_names = vec![SanType::URI("https://example.org/x".try_into().unwrap())]
        });
        assert!(matches!(
            parse_svid_leaf(&http),
            Err(LeafError::NotSpiffe { .. })
        ));
        assert!(matches!(
            parse_svid_leaf(b"not a certificate"),
            Err(LeafError::Malformed(_))
        ));
    }
}

/// DER as a PEM block with `label` (e.g. `CERTIFICATE`, `PRIVATE KEY`),
/// 64 base64 characters a line, for TLS stacks that take PEM; the SPIFFE
/// Workload API hands out DER.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod pem_tests {
    #[test]
    fn pem_wraps_at_64_and_round_trips() {
        let der: Vec<u8> = (0..=255u8).collect();
        let text = super::pem("CERTIFICATE", &der);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
        assert!(lines[1..lines.len() - 1].iter().all(|l| l.len() <= 64));
        use base64::Engine;
        let body: String = lines[1..lines.len() - 1].concat();
        let back = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        assert_eq!(back, der);
    }
}
