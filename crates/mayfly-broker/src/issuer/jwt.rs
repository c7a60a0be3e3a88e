//! Signs RFC 9068 access tokens as compact JWS. The header is fixed per key
//! and encoded once; each token costs one JSON encoding and one signature.

use std::sync::Arc;

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

/// A key ring in which no key of the signing algorithm signs now.
#[derive(Debug, thiserror::Error)]
#[error("no {alg} key signs now")]
pub struct NoSigningKey {
    /// The signing algorithm (`ES256`, `EdDSA`).
    pub alg: &'static str,
}

/// One key of the ring and the second from which it signs.
#[derive(Debug)]
struct RingKey {
    key: SigningKey,
    /// base64url of the fixed header `{"alg","kid","typ":"at+jwt"}`.
    header_b64: String,
    /// Unix seconds from which it signs (0: from the start).
    from: u64,
}

/// The keys as the key directory said at the last look, sorted by `from`.
#[derive(Debug, Default)]
struct Ring {
    keys: Vec<RingKey>,
}

fn ring_key(key: SigningKey, from: u64) -> RingKey {
    let header = json!({"alg": key.alg(), "kid": key.kid(), "typ": ACCESS_TOKEN_TYPE});
    RingKey {
        header_b64: URL_SAFE_NO_PAD.encode(header.to_string()),
        key,
        from,
    }
}

/// `header_b64.payload.signature`, signed by `key`.
fn sign_parts(key: &SigningKey, header_b64: &str, payload: &[u8]) -> Result<String, SignError> {
    let mut out = String::with_capacity(header_b64.len() + payload.len() * 4 / 3 + 100);
    out.push_str(header_b64);
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut out);
    let sig = key.sign(out.as_bytes()).map_err(|_| SignError::Crypto)?;
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(sig, &mut out);
    Ok(out)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs tokens with the active key and publishes the JWKS, from a ring of
/// keys that may change over time (the [`ring`](super::ring) files):
///
/// - the active key is the key of the configured algorithm with the latest
///   start at or before now;
/// - the JWKS holds the active key, every key whose start is still to come
///   (published before it signs), every key of the other algorithm, and a
///   key that stopped signing until `retire_after` (the longest token life
///   plus validators' clock leeway) after its successor started, so no
///   token it signed meets a JWKS without it.
///
/// Every replica reading the same files and clock switches at the same
/// second, whenever it read them.
#[derive(Debug)]
pub struct JwtSigner {
    /// The algorithm that signs.
    alg: &'static str,
    /// How long a key stays published after its successor started.
    retire_after: u64,
    ring: std::sync::RwLock<Arc<Ring>>,
    /// The JWKS text and the second until which it holds.
    jwks: std::sync::Mutex<Option<(u64, Arc<str>)>>,
}

impl JwtSigner {
    /// A signer for `key` alone; `also_published` are older or alternate keys
    /// that validators may still meet, published in the JWKS but never used
    /// to sign.
    pub fn new(key: SigningKey, also_published: Vec<SigningKey>) -> Self {
        let alg = key.alg();
        // Published-only keys of the same algorithm sort before the active
        // one and never retire (no successor start to count from).
        let mut keys: Vec<RingKey> = also_published.into_iter().map(|k| ring_key(k, 0)).collect();
        keys.push(ring_key(key, 0));
        Self {
            alg,
            retire_after: u64::MAX,
            ring: std::sync::RwLock::new(Arc::new(Ring { keys })),
            jwks: std::sync::Mutex::new(None),
        }
    }

    /// A signer over `keys` (each with the second it signs from) for `alg`,
    /// keeping a superseded key published `retire_after` after its successor
    /// starts. Fails if no key of `alg` signs now.
    pub fn from_ring(
        alg: &'static str,
        keys: Vec<(SigningKey, u64)>,
        retire_after: std::time::Duration,
    ) -> Result<Self, NoSigningKey> {
        let signer = Self {
            alg,
            retire_after: retire_after.as_secs(),
            ring: std::sync::RwLock::new(Arc::new(Ring::default())),
            jwks: std::sync::Mutex::new(None),
        };
        signer.replace(keys)?;
        Ok(signer)
    }

    /// Replaces the ring; refused (the old ring kept) if no key of the
    /// signing algorithm would sign now.
    pub fn replace(&self, keys: Vec<(SigningKey, u64)>) -> Result<(), NoSigningKey> {
        let mut keys: Vec<RingKey> = keys
            .into_iter()
            .map(|(k, from)| ring_key(k, from))
            .collect();
        keys.sort_by_key(|k| k.from);
        let ring = Ring { keys };
        if ring.active(self.alg, now_secs()).is_none() {
            return Err(NoSigningKey { alg: self.alg });
        }
        *self
            .ring
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(ring);
        *self
            .jwks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        Ok(())
    }

    fn current(&self) -> Arc<Ring> {
        self.ring
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Signs `claims` into a compact JWS.
    pub fn sign(&self, claims: &AccessTokenClaims) -> Result<AccessToken, SignError> {
        let ring = self.current();
        let active = ring.active(self.alg, now_secs()).ok_or(SignError::Crypto)?;
        let payload = Zeroizing::new(serde_json::to_vec(claims)?);
        sign_parts(&active.key, &active.header_b64, &payload)
            .map(|t| AccessToken(Zeroizing::new(t)))
    }

    /// Signs `claims` with the active key under the header `typ` (not an
    /// access token: a Status List Token, a Security Event Token).
    pub fn sign_typed(&self, typ: &str, claims: &serde_json::Value) -> Result<String, SignError> {
        let ring = self.current();
        let active = ring.active(self.alg, now_secs()).ok_or(SignError::Crypto)?;
        let header = json!({"alg": active.key.alg(), "kid": active.key.kid(), "typ": typ});
        let payload = serde_json::to_vec(claims)?;
        sign_parts(
            &active.key,
            &URL_SAFE_NO_PAD.encode(header.to_string()),
            &payload,
        )
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
        let ring = self.current();
        let key = ring
            .published(self.alg, self.retire_after, now_secs())
            .map(|k| &k.key)
            .find(|k| header["kid"] == k.kid() && header["alg"] == k.alg())?;
        let sig = URL_SAFE_NO_PAD.decode(s).ok()?;
        let signed = &token[..h.len() + 1 + p.len()];
        if !key.verify(signed.as_bytes(), &sig) {
            return None;
        }
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).ok()?).ok()
    }

    /// The JWKS document as published now (kept until the next second a
    /// key starts or retires).
    pub fn jwks_json(&self) -> Arc<str> {
        let now = now_secs();
        let mut cached = self
            .jwks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((until, text)) = cached.as_ref()
            && now < *until
        {
            return text.clone();
        }
        let ring = self.current();
        let keys: Vec<_> = ring
            .published(self.alg, self.retire_after, now)
            .map(|k| k.key.jwk().clone())
            .collect();
        let text: Arc<str> = json!({ "keys": keys }).to_string().into();
        *cached = Some((
            ring.next_change(self.alg, self.retire_after, now),
            text.clone(),
        ));
        text
    }

    /// The JWKS document as published now.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::from_str(&self.jwks_json()).unwrap_or_default()
    }

    /// The ids of the keys published now.
    pub fn published_kids(&self) -> Vec<String> {
        self.current()
            .published(self.alg, self.retire_after, now_secs())
            .map(|k| k.key.kid().to_owned())
            .collect()
    }

    /// The active key's id.
    pub fn kid(&self) -> String {
        self.current()
            .active(self.alg, now_secs())
            .map(|k| k.key.kid().to_owned())
            .unwrap_or_default()
    }

    /// The signing algorithm.
    pub fn alg(&self) -> &'static str {
        self.alg
    }
}

impl Ring {
    /// The key of `alg` with the latest start at or before `now`.
    fn active(&self, alg: &str, now: u64) -> Option<&RingKey> {
        self.keys
            .iter()
            .rfind(|k| k.key.alg() == alg && k.from <= now)
    }

    /// When the key after `k` (same algorithm) starts, if one is due.
    fn successor_start(&self, k: &RingKey) -> Option<u64> {
        self.keys
            .iter()
            .filter(|n| n.key.alg() == k.key.alg() && n.from > k.from)
            .map(|n| n.from)
            .next()
    }

    /// The keys in the JWKS at `now`.
    fn published<'a>(
        &'a self,
        alg: &'a str,
        retire_after: u64,
        now: u64,
    ) -> impl Iterator<Item = &'a RingKey> + 'a {
        self.keys.iter().filter(move |k| {
            if k.key.alg() != alg {
                return true;
            }
            match self.successor_start(k) {
                // Superseded: until its last token can no longer be met.
                Some(next) if next <= now => next.saturating_add(retire_after) > now,
                // Active, or still to come.
                _ => true,
            }
        })
    }

    /// The next second at which the JWKS changes.
    fn next_change(&self, alg: &str, retire_after: u64, now: u64) -> u64 {
        self.keys
            .iter()
            .filter(|k| k.key.alg() == alg)
            .flat_map(|k| {
                let retire = self
                    .successor_start(k)
                    .map(|n| n.saturating_add(retire_after));
                [Some(k.from), retire]
            })
            .flatten()
            .filter(|t| *t > now)
            .min()
            .unwrap_or(u64::MAX)
    }
}
