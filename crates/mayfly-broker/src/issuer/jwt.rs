//! Signs RFC 9068 access tokens as compact JWS. The header is fixed per key
//! and encoded once; each token costs one JSON encoding and one signature.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mayfly_core::{ACCESS_TOKEN_TYPE, AccessTokenClaims};
use serde_json::json;
use zeroize::Zeroizing;

use super::keys::SigningKey;

/// A signed access token. A bearer secret: `Debug` hides it and the memory
/// is wiped on drop. Never log it.
pub struct AccessToken(Zeroizing<String>);

impl AccessToken {
    /// The compact JWS, to hand to the caller.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Moves the compact JWS out, to hand to the caller.
    pub fn into_string(self) -> String {
        self.0.as_str().to_owned()
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(…)")
    }
}

/// Why a token could not be signed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// Claims could not be encoded.
    #[error("cannot encode claims: {0}")]
    Encode(#[from] serde_json::Error),
    /// The signing primitive failed.
    #[error("signing failed")]
    Crypto,
}

/// Signs tokens with the active key and publishes the JWKS.
#[derive(Debug)]
pub struct JwtSigner {
    /// The active key.
    key: SigningKey,
    /// base64url of the fixed header `{"alg","kid","typ":"at+jwt"}`.
    header_b64: String,
    /// The JWKS document served at `/.well-known/jwks.json`.
    jwks: serde_json::Value,
    /// Keys still published (older or alternate), for checking tokens.
    published: Vec<SigningKey>,
}

impl JwtSigner {
    /// A signer for `key`; `also_published` are older or alternate keys that
    /// validators may still meet, published in the JWKS but not used to sign.
    pub fn new(key: SigningKey, also_published: Vec<SigningKey>) -> Self {
        let header = json!({"alg": key.alg(), "kid": key.kid(), "typ": ACCESS_TOKEN_TYPE});
        let header_b64 = URL_SAFE_NO_PAD.encode(header.to_string());
        let keys: Vec<_> = std::iter::once(&key)
            .chain(&also_published)
            .map(|k| k.jwk().clone())
            .collect();
        Self {
            key,
            header_b64,
            jwks: json!({ "keys": keys }),
            published: also_published,
        }
    }

    /// Signs `claims` into a compact JWS.
    pub fn sign(&self, claims: &AccessTokenClaims) -> Result<AccessToken, SignError> {
        let payload = Zeroizing::new(serde_json::to_vec(claims)?);
        let mut out = String::with_capacity(self.header_b64.len() + payload.len() * 4 / 3 + 100);
        out.push_str(&self.header_b64);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&*payload, &mut out);
        let sig = self
            .key
            .sign(out.as_bytes())
            .map_err(|_| SignError::Crypto)?;
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig, &mut out);
        Ok(AccessToken(Zeroizing::new(out)))
    }

    /// The claims of a token this broker signed (any published key), if its
    /// header and signature check out. Says nothing of expiry or
    /// revocation.
    pub fn verify(&self, token: &str) -> Option<AccessTokenClaims> {
        let mut parts = token.splitn(3, '.');
        let (h, p, s) = (parts.next()?, parts.next()?, parts.next()?);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).ok()?).ok()?;
        if header["typ"] != ACCESS_TOKEN_TYPE {
            return None;
        }
        let key = std::iter::once(&self.key)
            .chain(&self.published)
            .find(|k| header["kid"] == k.kid() && header["alg"] == k.alg())?;
        let sig = URL_SAFE_NO_PAD.decode(s).ok()?;
        let signed = &token[..h.len() + 1 + p.len()];
        if !key.verify(signed.as_bytes(), &sig) {
            return None;
        }
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).ok()?).ok()
    }

    /// The JWKS document.
    pub fn jwks(&self) -> &serde_json::Value {
        &self.jwks
    }

    /// The active key's id.
    pub fn kid(&self) -> &str {
        self.key.kid()
    }

    /// The active algorithm.
    pub fn alg(&self) -> &'static str {
        self.key.alg()
    }
}
