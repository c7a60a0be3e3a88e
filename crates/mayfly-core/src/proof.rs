//! How a caller proved itself ([`Proof`]) and what a token is bound to
//! ([`Binding`]): typed from the edge that learns them to the lease that
//! keeps them, to policy and to the audit record.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::claims::Confirmation;

/// How a caller proved its SPIFFE ID. Policy sees it as
/// `principal.authenticated_by`: `certificate`, or the workload token's
/// issuer (whose name may not be `certificate`, checked at load). Stored
/// with every task and lease, as `null` (a certificate) or the issuer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum Proof {
    /// An X.509-SVID at the TLS handshake.
    #[default]
    Certificate,
    /// A workload token of a `[[federation]]` issuer.
    Token {
        /// The issuer's name (its `iss`, or `spiffe://<td>` for JWT-SVIDs).
        issuer: String,
    },
}

impl Proof {
    /// The name policy sees for a certificate.
    pub const CERTIFICATE: &'static str = "certificate";

    /// As policy and the audit trail name it: `certificate`, or the issuer.
    pub fn name(&self) -> &str {
        match self {
            Self::Certificate => Self::CERTIFICATE,
            Self::Token { issuer } => issuer,
        }
    }

    /// The workload token's issuer; `None` for a certificate.
    pub fn token_issuer(&self) -> Option<&str> {
        match self {
            Self::Certificate => None,
            Self::Token { issuer } => Some(issuer),
        }
    }

    /// Whether it is a client certificate (stored as nothing).
    pub fn is_certificate(&self) -> bool {
        matches!(self, Self::Certificate)
    }
}

impl Serialize for Proof {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.token_issuer().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Proof {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<String>::deserialize(d)? {
            None => Self::Certificate,
            Some(issuer) => Self::Token { issuer },
        })
    }
}

/// What a token is bound to: its holder must prove it has the key, or
/// nothing (a bearer token). Policy sees it as `context.binding`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum Binding {
    /// Nothing: a bearer token.
    #[default]
    Bearer,
    /// The client certificate of the request (RFC 8705): SHA-256 of its
    /// DER, base64url.
    Certificate {
        /// `cnf.x5t#S256`.
        x5t_s256: String,
    },
    /// A DPoP key (RFC 9449): its RFC 7638 thumbprint.
    Dpop {
        /// `cnf.jkt`.
        jkt: String,
    },
}

impl Binding {
    /// As policy sees it (`context.binding`): `none`, `certificate` or
    /// `dpop`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Bearer => "none",
            Self::Certificate { .. } => "certificate",
            Self::Dpop { .. } => "dpop",
        }
    }

    /// The OAuth token type a client presents it with: `DPoP` or `Bearer`
    /// (a certificate-bound token is a bearer token sent over mTLS).
    pub fn token_type(&self) -> &'static str {
        match self {
            Self::Dpop { .. } => "DPoP",
            Self::Bearer | Self::Certificate { .. } => "Bearer",
        }
    }

    /// The token's `cnf` claim; `None` for a bearer token.
    pub fn confirmation(&self) -> Option<Confirmation> {
        match self {
            Self::Bearer => None,
            Self::Certificate { x5t_s256 } => Some(Confirmation {
                x5t_s256: Some(x5t_s256.clone()),
                jkt: None,
            }),
            Self::Dpop { jkt } => Some(Confirmation {
                x5t_s256: None,
                jkt: Some(jkt.clone()),
            }),
        }
    }

    /// The certificate thumbprint it is bound to, if any.
    pub fn x5t_s256(&self) -> Option<&str> {
        match self {
            Self::Certificate { x5t_s256 } => Some(x5t_s256),
            _ => None,
        }
    }

    /// The DPoP key thumbprint it is bound to, if any.
    pub fn jkt(&self) -> Option<&str> {
        match self {
            Self::Dpop { jkt } => Some(jkt),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_is_stored_as_its_issuer_or_nothing() {
        let token = Proof::Token {
            issuer: "https://kubernetes.default.svc".into(),
        };
        assert_eq!(serde_json::to_string(&Proof::Certificate).unwrap(), "null");
        let json = serde_json::to_string(&token).unwrap();
        assert_eq!(json, r#""https://kubernetes.default.svc""#);
        assert_eq!(serde_json::from_str::<Proof>(&json).unwrap(), token);
        assert_eq!(
            serde_json::from_str::<Proof>("null").unwrap(),
            Proof::Certificate
        );
        assert_eq!(Proof::Certificate.name(), "certificate");
        assert_eq!(token.name(), "https://kubernetes.default.svc");
    }

    #[test]
    fn bindings_name_themselves_as_policy_and_clients_see_them() {
        let dpop = Binding::Dpop { jkt: "k".into() };
        let cert = Binding::Certificate {
            x5t_s256: "t".into(),
        };
        assert_eq!(
            [Binding::Bearer.name(), cert.name(), dpop.name()],
            ["none", "certificate", "dpop"]
        );
        assert_eq!(
            [
                Binding::Bearer.token_type(),
                cert.token_type(),
                dpop.token_type()
            ],
            ["Bearer", "Bearer", "DPoP"]
        );
        assert_eq!(Binding::Bearer.confirmation(), None);
        assert_eq!(dpop.confirmation().unwrap().jkt.as_deref(), Some("k"));
        assert_eq!(cert.x5t_s256(), Some("t"));
    }
}
