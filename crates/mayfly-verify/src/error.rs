//! Why a token was refused: one variant per check.

use std::time::Duration;

/// The check a token failed. `Display` says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Not a compact JWS, or its header or claims do not parse.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `alg` outside the allow-list (ES256, EdDSA): `none`, HS256, RS256, …
    #[error("algorithm {0:?} is not accepted (only ES256 and EdDSA)")]
    Algorithm(String),
    /// `typ` is not `at+jwt`.
    #[error("token type {0:?} is not at+jwt")]
    WrongType(Option<String>),
    /// No `kid`, or a `kid` the issuer's JWKS does not have.
    #[error("unknown signing key {0:?}")]
    UnknownKey(Option<String>),
    /// The header's `alg` differs from the algorithm of the key named by `kid`.
    #[error("token says {token} but key {kid} is {key}")]
    KeyAlgorithmMismatch {
        /// The key id.
        kid: String,
        /// The header's algorithm.
        token: String,
        /// The key's algorithm.
        key: String,
    },
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// `iss` is not the configured issuer.
    #[error("issuer is not the configured one")]
    WrongIssuer,
    /// `aud` is not this service.
    #[error("token is for another audience")]
    WrongAudience,
    /// `exp` has passed (beyond the leeway).
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// A required claim is missing.
    #[error("token lacks the {0} claim")]
    MissingClaim(String),
    /// The broker revoked the token.
    #[error("token has been revoked")]
    Revoked,
    /// The token is bound to a certificate (`cnf`) but none was presented.
    #[error("token is bound to a client certificate; present it")]
    CertificateRequired,
    /// The presented certificate is not the one the token is bound to.
    #[error("token is bound to another client certificate")]
    CertificateMismatch,
    /// The token is DPoP-bound (`cnf.jkt`) but came as a bearer token.
    #[error("token is bound to a DPoP key: send it as Authorization: DPoP with a DPoP proof")]
    DpopRequired,
    /// The token came with the DPoP scheme but is not DPoP-bound.
    #[error("token is not bound to a DPoP key: send it as a Bearer token")]
    NotDpopBound,
    /// The DPoP proof failed a check (named).
    #[error(transparent)]
    Dpop(#[from] mayfly_core::dpop::DpopError),
    /// No word from the revocation feed for too long: revocations may be
    /// missing, so verification fails closed.
    #[error("revocation feed silent for {0:?}; failing closed")]
    FeedStale(Duration),
    /// The revocation feed has not delivered its first full replay yet.
    #[error("revocation feed not synchronised yet; failing closed")]
    FeedNotSynced,
    /// The token names no status list of its issuer, and this verifier
    /// reads revocations from the Token Status Lists.
    #[error("token names no status list of its issuer")]
    StatusMissing,
    /// The token's status list is not held fresh and could not be
    /// fetched: revocations may be missing, so verification fails closed.
    #[error("status list unavailable: {0}; failing closed")]
    StatusUnavailable(String),
    /// The JWKS could not be fetched or used.
    #[error("JWKS unavailable: {0}")]
    JwksUnavailable(#[from] crate::JwksError),
}

impl VerifyError {
    /// A stable name for the check that failed (`revoked`, `expired`,
    /// `wrong_audience`, `dpop`, …), as services report it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Algorithm(_) => "algorithm",
            Self::WrongType(_) => "wrong_type",
            Self::UnknownKey(_) => "unknown_key",
            Self::KeyAlgorithmMismatch { .. } => "key_algorithm_mismatch",
            Self::BadSignature => "bad_signature",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::MissingClaim(_) => "missing_claim",
            Self::Revoked => "revoked",
            Self::CertificateRequired => "certificate_required",
            Self::CertificateMismatch => "certificate_mismatch",
            Self::DpopRequired => "dpop_required",
            Self::NotDpopBound => "not_dpop_bound",
            Self::Dpop(_) => "dpop",
            Self::FeedStale(_) => "feed_stale",
            Self::FeedNotSynced => "feed_not_synced",
            Self::StatusMissing => "status_missing",
            Self::StatusUnavailable(_) => "status_unavailable",
            Self::JwksUnavailable(_) => "jwks_unavailable",
        }
    }

    /// Whether the problem is on the verifier's side (feed, status list
    /// or JWKS), not
    /// the token's: such requests deserve 503, not 401.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::FeedStale(_)
                | Self::FeedNotSynced
                | Self::StatusUnavailable(_)
                | Self::JwksUnavailable(_)
        )
    }
}
