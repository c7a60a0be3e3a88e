//! The claims of a Mayfly access token (RFC 9068 JWT profile).

use serde::{Deserialize, Serialize};

/// The header `typ` of every Mayfly access token (RFC 9068 section 2.1).
pub const ACCESS_TOKEN_TYPE: &str = "at+jwt";

/// What a bound token is bound to (RFC 7800 `cnf`): the client
/// certificate (RFC 8705) or a DPoP key (RFC 9449), one of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// base64url (no padding) of SHA-256 over the certificate's DER.
    #[serde(rename = "x5t#S256", default, skip_serializing_if = "Option::is_none")]
    pub x5t_s256: Option<String>,
    /// RFC 7638 thumbprint of the DPoP key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jkt: Option<String>,
}

/// RFC 8693 actor claim: who acts on behalf of `sub`. Nested `act` names
/// earlier actors in a delegation chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorClaim {
    /// The actor's SPIFFE ID.
    pub sub: String,
    /// The actor before this one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<ActorClaim>>,
}

/// RFC 9068 access-token claims as Mayfly issues them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessTokenClaims {
    /// The broker's issuer URL.
    pub iss: String,
    /// The agent's SPIFFE ID.
    pub sub: String,
    /// Exactly one audience.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at.
    pub iat: u64,
    /// Not before (= `iat`).
    pub nbf: u64,
    /// The lease id.
    pub jti: String,
    /// The agent's SPIFFE ID (RFC 9068 requires `client_id`).
    pub client_id: String,
    /// Space-separated scopes; absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The task the token belongs to.
    pub task_id: String,
    /// Certificate binding, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
    /// Delegation chain, when the task was delegated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<ActorClaim>,
    /// Where the token's revocation is published (the Token Status List).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<crate::status_list::StatusClaim>,
}
