//! Revocations from the broker's Token Status Lists
//! (draft-ietf-oauth-status-list), for a service that reads them instead
//! of (or besides) the feed.
//!
//! A token's list must be one of its issuer's (`<issuer>/statuslists/<n>`):
//! a token cannot make the verifier fetch anything else. A list is fetched
//! over the JWKS's TLS trust, checked (`typ` `statuslist+jwt`, a key of the
//! JWKS, the signature, `iss`, `sub` equal to its URI, `iat`, `exp`) and
//! held for its `ttl` (at most [`StatusListConfig::max_ttl`]). A list
//! held is fetched again in the background once half its `ttl` passed; a
//! list older than its `ttl` refuses its tokens until it is fetched again
//! (fail closed).

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Validation};
use mayfly_core::status_list::{
    STATUS_LIST_MEDIA_TYPE, STATUS_LIST_TYPE, StatusBits, StatusClaim, StatusListClaim,
};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::VerifyError;
use crate::jwks::{FETCH_TIMEOUT, Jwks};

/// The largest Status List Token fetched.
const MAX_LIST_TOKEN_BYTES: usize = 1 << 20;

/// How often the background refresher looks at the lists held.
const REFRESH_TICK: Duration = Duration::from_millis(250);

/// How a verifier reads the Token Status Lists.
#[derive(Debug, Clone)]
pub struct StatusListConfig {
    /// The longest a list is held, whatever its `ttl` says: the longest a
    /// revocation takes to reach this verifier.
    pub max_ttl: Duration,
}

impl Default for StatusListConfig {
    fn default() -> Self {
        Self {
            max_ttl: Duration::from_secs(60),
        }
    }
}

/// One list held.
struct Held {
    bits: Arc<StatusBits>,
    fetched: Instant,
    /// How long it may be used from `fetched`.
    ttl: Duration,
}

#[derive(Deserialize)]
struct ListHeader {
    alg: Option<String>,
    typ: Option<String>,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct ListClaims {
    sub: String,
    #[serde(default)]
    ttl: Option<f64>,
    exp: u64,
    status_list: StatusListClaim,
}

/// The lists of one issuer.
pub(crate) struct StatusLists {
    /// `<issuer>/statuslists/`.
    prefix: String,
    issuer: String,
    config: StatusListConfig,
    leeway: Duration,
    held: RwLock<HashMap<u64, Held>>,
    /// One fetch at a time.
    fetching: Mutex<()>,
}

impl StatusLists {
    pub(crate) fn new(issuer: &str, config: StatusListConfig, leeway: Duration) -> Self {
        let issuer = issuer.trim_end_matches('/').to_owned();
        Self {
            prefix: format!("{issuer}/statuslists/"),
            issuer,
            config,
            leeway,
            held: RwLock::new(HashMap::new()),
            fetching: Mutex::new(()),
        }
    }

    /// The list and index a token names, which must be its issuer's.
    pub(crate) fn reference(
        &self,
        status: Option<&StatusClaim>,
    ) -> Result<(u64, u64), VerifyError> {
        let r = &status.ok_or(VerifyError::StatusMissing)?.status_list;
        let n = r
            .uri
            .strip_prefix(&self.prefix)
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or(VerifyError::StatusMissing)?;
        Ok((n, r.idx))
    }

    /// Whether the token at `idx` of list `n` is revoked, from the list
    /// held; `Err(StatusUnavailable)` when none fresh is held.
    pub(crate) fn is_revoked(&self, n: u64, idx: u64) -> Result<bool, VerifyError> {
        let held = self.held.read().unwrap_or_else(|e| e.into_inner());
        match held.get(&n) {
            Some(h) if h.fetched.elapsed() < h.ttl => Ok(h.bits.is_set(idx)),
            Some(_) => Err(VerifyError::StatusUnavailable(format!(
                "status list {n} is older than its ttl"
            ))),
            None => Err(VerifyError::StatusUnavailable(format!(
                "status list {n} not fetched yet"
            ))),
        }
    }

    /// Fetches list `n` unless one fresher than half its `ttl` is held.
    pub(crate) async fn fetch(&self, n: u64, jwks: &Jwks) -> Result<(), VerifyError> {
        let _one = self.fetching.lock().await;
        if self.fresh_enough(n) {
            return Ok(());
        }
        let unavailable = |why: String| VerifyError::StatusUnavailable(format!("list {n}: {why}"));
        let uri = format!("{}{n}", self.prefix);
        let url: hyper::Uri = uri.parse().map_err(|e| unavailable(format!("{e}")))?;
        let fetcher = jwks
            .fetcher()
            .ok_or_else(|| unavailable("this verifier fetches nothing".into()))?;
        let fetched = tokio::time::timeout(
            FETCH_TIMEOUT,
            fetcher.get(&url, STATUS_LIST_MEDIA_TYPE, MAX_LIST_TOKEN_BYTES),
        )
        .await
        .map_err(|_| unavailable("fetch timed out".into()))?
        .map_err(|e| unavailable(e.to_string()))?;
        let token = std::str::from_utf8(&fetched).map_err(|_| unavailable("not text".into()))?;
        let (bits, ttl) = self.check(token, &uri, jwks).map_err(unavailable)?;
        self.held.write().unwrap_or_else(|e| e.into_inner()).insert(
            n,
            Held {
                bits: Arc::new(bits),
                fetched: Instant::now(),
                ttl,
            },
        );
        Ok(())
    }

    fn fresh_enough(&self, n: u64) -> bool {
        let held = self.held.read().unwrap_or_else(|e| e.into_inner());
        held.get(&n)
            .is_some_and(|h| h.fetched.elapsed() < h.ttl / 2)
    }

    /// A Status List Token's bits and how long they may be held.
    fn check(&self, token: &str, uri: &str, jwks: &Jwks) -> Result<(StatusBits, Duration), String> {
        let header: ListHeader = token
            .split('.')
            .next()
            .and_then(|h| URL_SAFE_NO_PAD.decode(h).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("header is not base64url JSON")?;
        if header.typ.as_deref() != Some(STATUS_LIST_TYPE) {
            return Err(format!("typ {:?} is not {STATUS_LIST_TYPE}", header.typ));
        }
        let alg = match header.alg.as_deref() {
            Some("ES256") => Algorithm::ES256,
            Some("EdDSA") => Algorithm::EdDSA,
            other => return Err(format!("alg {other:?} is not accepted")),
        };
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| jwks.get(kid))
            .filter(|k| k.alg == alg)
            .ok_or("not signed by a key of the issuer's JWKS")?;
        let mut v = Validation::new(alg);
        v.set_issuer(&[&self.issuer]);
        v.validate_aud = false;
        v.leeway = self.leeway.as_secs();
        v.set_required_spec_claims(&["exp", "iss", "sub", "iat"]);
        let claims = jsonwebtoken::decode::<ListClaims>(token, &key.key, &v)
            .map_err(|e| format!("{e}"))?
            .claims;
        if claims.sub != uri {
            return Err("its sub is not its URI".into());
        }
        let bits = StatusBits::from_claim(&claims.status_list).map_err(|e| e.to_string())?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_secs());
        let ttl = claims
            .ttl
            .filter(|t| t.is_finite() && *t > 0.0)
            .map_or(Duration::ZERO, Duration::from_secs_f64)
            .min(self.config.max_ttl)
            .min(Duration::from_secs(claims.exp.saturating_sub(now)));
        Ok((bits, ttl))
    }

    /// The lists held that are past half their `ttl`.
    fn due(&self) -> Vec<u64> {
        let held = self.held.read().unwrap_or_else(|e| e.into_inner());
        held.iter()
            .filter(|(_, h)| h.fetched.elapsed() >= h.ttl / 2)
            .map(|(n, _)| *n)
            .collect()
    }
}

/// Keeps every list held fresh until the verifier is dropped, so the
/// requests that meet it never wait.
pub(crate) async fn refresh(lists: Weak<StatusLists>, jwks: Weak<Jwks>) {
    loop {
        tokio::time::sleep(REFRESH_TICK).await;
        let (Some(lists), Some(jwks)) = (lists.upgrade(), jwks.upgrade()) else {
            return;
        };
        for n in lists.due() {
            if let Err(e) = lists.fetch(n, &jwks).await {
                tracing::warn!(error = %e, "status list refresh failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use jsonwebtoken::{EncodingKey, Header, encode};
    use mayfly_core::status_list::{StatusListRef, status_claim};
    use serde_json::{Value, json};

    use super::*;

    const ISSUER: &str = "https://broker.example";

    /// A list signer, the JWKS that holds its key, and the lists.
    fn setup() -> (EncodingKey, Jwks, StatusLists) {
        let key = rcgen::KeyPair::generate().unwrap();
        let point = key.public_key_raw();
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])});
        let jwks = Jwks::fixed(
            json!({"keys": [jwk]}).to_string().as_bytes(),
            &[Algorithm::ES256],
        )
        .unwrap();
        let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        let lists = StatusLists::new(
            ISSUER,
            StatusListConfig {
                max_ttl: Duration::from_secs(30),
            },
            Duration::from_secs(5),
        );
        (signing, jwks, lists)
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn claims(revoked: &[u64]) -> Value {
        let mut bits = StatusBits::new();
        for i in revoked {
            bits.set(*i);
        }
        json!({"iss": ISSUER, "sub": format!("{ISSUER}/statuslists/0"), "iat": now(),
            "exp": now() + 60, "ttl": 10, "status_list": bits.claim()})
    }

    fn sign(key: &EncodingKey, typ: &str, kid: &str, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.typ = Some(typ.into());
        h.kid = Some(kid.into());
        encode(&h, claims, key).unwrap()
    }

    #[test]
    fn a_good_list_is_read_and_held_no_longer_than_allowed() {
        let (key, jwks, lists) = setup();
        let uri = format!("{ISSUER}/statuslists/0");
        let token = sign(&key, STATUS_LIST_TYPE, "k1", &claims(&[3]));
        let (bits, ttl) = lists.check(&token, &uri, &jwks).unwrap();
        assert!(bits.is_set(3) && !bits.is_set(2));
        assert_eq!(ttl, Duration::from_secs(10));
        let mut long = claims(&[]);
        long["ttl"] = json!(3600);
        let (_, ttl) = lists
            .check(&sign(&key, STATUS_LIST_TYPE, "k1", &long), &uri, &jwks)
            .unwrap();
        assert_eq!(ttl, Duration::from_secs(30), "capped at max_ttl");
    }

    #[test]
    fn every_forged_or_foreign_list_is_refused() {
        let (key, jwks, lists) = setup();
        let uri = format!("{ISSUER}/statuslists/0");
        let good = claims(&[]);
        let with = |field: &str, v: Value| {
            let mut c = good.clone();
            c[field] = v;
            c
        };
        let cases = [
            ("an access token", sign(&key, "at+jwt", "k1", &good)),
            ("an unknown key", sign(&key, STATUS_LIST_TYPE, "k2", &good)),
            (
                "another list's token",
                sign(
                    &key,
                    STATUS_LIST_TYPE,
                    "k1",
                    &with("sub", json!(format!("{ISSUER}/statuslists/1"))),
                ),
            ),
            (
                "another issuer",
                sign(
                    &key,
                    STATUS_LIST_TYPE,
                    "k1",
                    &with("iss", json!("https://evil.example")),
                ),
            ),
            (
                "an expired list",
                sign(
                    &key,
                    STATUS_LIST_TYPE,
                    "k1",
                    &with("exp", json!(now() - 600)),
                ),
            ),
            (
                "two bits per token",
                sign(
                    &key,
                    STATUS_LIST_TYPE,
                    "k1",
                    &with("status_list", json!({"bits": 2, "lst": "eNoDAAAAAAE"})),
                ),
            ),
            ("an unsigned list", {
                let t = sign(&key, STATUS_LIST_TYPE, "k1", &good);
                let mut parts: Vec<&str> = t.split('.').collect();
                let header = URL_SAFE_NO_PAD.encode(
                    json!({"alg": "none", "typ": STATUS_LIST_TYPE, "kid": "k1"}).to_string(),
                );
                parts[0] = &header;
                format!("{}.{}.", parts[0], parts[1])
            }),
        ];
        for (what, token) in cases {
            assert!(lists.check(&token, &uri, &jwks).is_err(), "{what} was read");
        }
    }

    #[test]
    fn a_token_can_only_name_its_issuers_lists() {
        let (_, _, lists) = setup();
        let named = |uri: &str, idx: u64| StatusClaim {
            status_list: StatusListRef {
                idx,
                uri: uri.into(),
            },
        };
        assert_eq!(
            lists.reference(Some(&status_claim(ISSUER, (1 << 20) + 9))),
            Ok((1, 9 + (1 << 20)))
        );
        for uri in [
            "https://evil.example/statuslists/0",
            "https://broker.example.evil.example/statuslists/0",
            "https://broker.example/statuslists/../jwks",
            "https://broker.example/statuslists/",
            "https://broker.example/statuslists/+1",
            "https://broker.example/statuslists/99999999999999999999999",
        ] {
            assert_eq!(
                lists.reference(Some(&named(uri, 1))),
                Err(VerifyError::StatusMissing),
                "{uri}"
            );
        }
        assert_eq!(lists.reference(None), Err(VerifyError::StatusMissing));
    }
}
