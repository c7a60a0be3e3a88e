//! RFC 9449 DPoP: the proof a client sends in a `DPoP` header, signed with
//! a key it holds, and the RFC 7638 thumbprint of that key, which a
//! DPoP-bound token carries as `cnf.jkt`. The broker checks proofs at its
//! token endpoint and mayfly-verify on every request a bound token comes
//! with; both use [`verify_proof`] and a [`ReplayCache`].
//!
//! Accepted keys and algorithms: ES256 (P-256) and EdDSA (Ed25519), the
//! ones Mayfly signs with. Every check that fails is named.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{ECDSA_P256_SHA256_FIXED, ED25519, UnparsedPublicKey};
use serde::Deserialize;
use serde_json::Value;

use crate::time::Timestamp;

/// The header `typ` of a DPoP proof.
pub const PROOF_TYPE: &str = "dpop+jwt";

/// The signature algorithms a proof may use.
pub const ALGORITHMS: [&str; 2] = ["ES256", "EdDSA"];

/// How far a proof's `iat` may be from now, either way: older is stale,
/// newer is from a clock too far ahead.
pub const MAX_PROOF_AGE: Duration = Duration::from_secs(60);

/// Longest proof accepted, in bytes.
pub const MAX_PROOF_BYTES: usize = 4096;

/// Why a proof was refused; each names the check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DpopError {
    /// Not a compact JWS with JSON header and claims.
    #[error("DPoP proof is malformed: {0}")]
    Malformed(String),
    /// The header's `typ` is not `dpop+jwt`.
    #[error("DPoP proof typ must be \"dpop+jwt\"")]
    Type,
    /// An algorithm outside the allow-list (`none`, HMAC, …).
    #[error("DPoP proof alg {0:?} is not accepted (ES256 or EdDSA)")]
    Algorithm(String),
    /// The `jwk` is missing, private, of another type than `alg`, or bad.
    #[error("DPoP proof jwk: {0}")]
    Key(String),
    /// The signature does not verify with the proof's own key.
    #[error("DPoP proof signature does not verify with its jwk")]
    Signature,
    /// `htm` is not the request's method.
    #[error("DPoP proof htm {got:?} is not the request's method {want}")]
    Method {
        /// The proof's.
        got: String,
        /// The request's.
        want: String,
    },
    /// `htu` is not the request's URL.
    #[error("DPoP proof htu {got:?} is not the request's URL {want}")]
    Url {
        /// The proof's.
        got: String,
        /// The request's.
        want: String,
    },
    /// `iat` is older than the window allows.
    #[error("DPoP proof is stale: iat is {0} s ago (at most {max} s)", max = MAX_PROOF_AGE.as_secs())]
    Stale(u64),
    /// `iat` is too far in the future.
    #[error("DPoP proof iat is {0} s in the future")]
    Future(u64),
    /// A request with an access token needs `ath`.
    #[error("DPoP proof has no ath for the access token it comes with")]
    MissingAth,
    /// `ath` is not the hash of the access token sent.
    #[error("DPoP proof ath does not match the access token")]
    WrongAth,
    /// The proof's key is not the one the token is bound to.
    #[error("DPoP proof key is not the key the token is bound to (cnf.jkt)")]
    WrongKey,
    /// This proof (its `jti`) was seen before.
    #[error("DPoP proof jti was already used: a proof is good for one request")]
    Replayed,
    /// Too many proofs in the window to remember: refused rather than
    /// forgotten.
    #[error("too many DPoP proofs in flight; retry")]
    Busy,
}

/// What the request a proof comes with is.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The HTTP method.
    pub method: &'a str,
    /// The URL without query or fragment.
    pub url: &'a str,
    /// The access token sent with it, for `ath`; `None` at the token
    /// endpoint.
    pub access_token: Option<&'a str>,
    /// Now.
    pub now: Timestamp,
}

/// A proof that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// RFC 7638 thumbprint of its key: what `cnf.jkt` holds.
    pub jkt: String,
    /// Its `jti`, for the replay cache.
    pub jti: String,
    /// Its `iat`, seconds.
    pub iat: u64,
}

#[derive(Deserialize)]
struct Header {
    typ: Option<String>,
    alg: Option<String>,
    jwk: Option<Value>,
}

#[derive(Deserialize)]
struct Claims {
    jti: Option<String>,
    htm: Option<String>,
    htu: Option<String>,
    iat: Option<u64>,
    ath: Option<String>,
}

fn b64(part: &str, what: &str) -> Result<Vec<u8>, DpopError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| DpopError::Malformed(format!("{what} is not base64url")))
}

/// Checks `proof` for `request` (signature, `typ`, `alg`, key, `htm`,
/// `htu`, `iat` window, and `ath` when a token comes with it). The
/// replay check is the caller's ([`ReplayCache`]), as is comparing
/// [`Proof::jkt`] with a token's `cnf.jkt`.
pub fn verify_proof(proof: &str, request: &Request<'_>) -> Result<Proof, DpopError> {
    if proof.len() > MAX_PROOF_BYTES {
        return Err(DpopError::Malformed(format!(
            "longer than {MAX_PROOF_BYTES} bytes"
        )));
    }
    let mut parts = proof.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(DpopError::Malformed("not a compact JWS".into()));
    };
    let header: Header = serde_json::from_slice(&b64(h, "header")?)
        .map_err(|e| DpopError::Malformed(format!("header: {e}")))?;
    if header.typ.as_deref() != Some(PROOF_TYPE) {
        return Err(DpopError::Type);
    }
    let alg = header.alg.unwrap_or_default();
    if !ALGORITHMS.contains(&alg.as_str()) {
        return Err(DpopError::Algorithm(alg));
    }
    let jwk = header
        .jwk
        .ok_or_else(|| DpopError::Key("missing from the header".into()))?;
    let key = PublicKey::from_jwk(&jwk, &alg)?;
    let signature = b64(s, "signature")?;
    key.verify(&proof.as_bytes()[..h.len() + 1 + c.len()], &signature)?;

    let claims: Claims = serde_json::from_slice(&b64(c, "claims")?)
        .map_err(|e| DpopError::Malformed(format!("claims: {e}")))?;
    let missing = |name: &str| DpopError::Malformed(format!("claim {name} is missing"));
    let jti = claims.jti.ok_or_else(|| missing("jti"))?;
    if jti.is_empty() || jti.len() > 256 {
        return Err(DpopError::Malformed("jti must be 1 to 256 bytes".into()));
    }
    let htm = claims.htm.ok_or_else(|| missing("htm"))?;
    if htm != request.method {
        return Err(DpopError::Method {
            got: htm,
            want: request.method.to_owned(),
        });
    }
    let htu = claims.htu.ok_or_else(|| missing("htu"))?;
    if !same_url(&htu, request.url) {
        return Err(DpopError::Url {
            got: htu,
            want: request.url.to_owned(),
        });
    }
    let iat = claims.iat.ok_or_else(|| missing("iat"))?;
    let now = request.now.as_secs();
    let window = MAX_PROOF_AGE.as_secs();
    if now > iat && now - iat > window {
        return Err(DpopError::Stale(now - iat));
    }
    if iat > now && iat - now > window {
        return Err(DpopError::Future(iat - now));
    }
    if let Some(token) = request.access_token {
        let want = URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            token.as_bytes(),
        ));
        match claims.ath {
            None => return Err(DpopError::MissingAth),
            Some(ath) if ath != want => return Err(DpopError::WrongAth),
            Some(_) => {}
        }
    }
    Ok(Proof {
        jkt: key.thumbprint,
        jti,
        iat,
    })
}

/// `htu` against the request URL (RFC 9449 §4.3: without query and
/// fragment; scheme and host compared case-insensitively, a default port
/// the same as none).
fn same_url(htu: &str, url: &str) -> bool {
    fn norm(u: &str) -> Option<String> {
        let u = u.split(['?', '#']).next()?;
        let (scheme, rest) = u.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let mut authority = authority.to_ascii_lowercase();
        let default = match scheme.as_str() {
            "https" => ":443",
            "http" => ":80",
            _ => "",
        };
        if !default.is_empty() && authority.ends_with(default) {
            authority.truncate(authority.len() - default.len());
        }
        Some(format!("{scheme}://{authority}{path}"))
    }
    matches!((norm(htu), norm(url)), (Some(a), Some(b)) if a == b)
}

/// A proof's public key, checked against its algorithm.
struct PublicKey {
    /// P-256 (ES256) if set, else Ed25519 (EdDSA).
    ec: bool,
    /// The uncompressed point, or the Ed25519 key.
    bytes: Vec<u8>,
    /// Its RFC 7638 thumbprint.
    thumbprint: String,
}

impl PublicKey {
    fn from_jwk(jwk: &Value, alg: &str) -> Result<Self, DpopError> {
        let obj = jwk
            .as_object()
            .ok_or_else(|| DpopError::Key("not a JSON object".into()))?;
        if obj.contains_key("d") {
            return Err(DpopError::Key("holds a private key".into()));
        }
        let text = |name: &str| {
            obj.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| DpopError::Key(format!("member {name} is missing")))
        };
        let coordinate = |name: &str, len: usize| -> Result<Vec<u8>, DpopError> {
            let v = URL_SAFE_NO_PAD
                .decode(text(name)?)
                .map_err(|_| DpopError::Key(format!("{name} is not base64url")))?;
            if v.len() != len {
                return Err(DpopError::Key(format!("{name} must be {len} bytes")));
            }
            Ok(v)
        };
        match (alg, text("kty")?, text("crv")?) {
            ("ES256", "EC", "P-256") => {
                let (x, y) = (coordinate("x", 32)?, coordinate("y", 32)?);
                let mut bytes = vec![0x04];
                bytes.extend_from_slice(&x);
                bytes.extend_from_slice(&y);
                Ok(Self {
                    ec: true,
                    bytes,
                    thumbprint: thumbprint(&format!(
                        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
                        URL_SAFE_NO_PAD.encode(&x),
                        URL_SAFE_NO_PAD.encode(&y)
                    )),
                })
            }
            ("EdDSA", "OKP", "Ed25519") => {
                let x = coordinate("x", 32)?;
                Ok(Self {
                    ec: false,
                    thumbprint: thumbprint(&format!(
                        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
                        URL_SAFE_NO_PAD.encode(&x)
                    )),
                    bytes: x,
                })
            }
            (alg, kty, crv) => Err(DpopError::Key(format!(
                "a {kty} {crv} key does not go with alg {alg}"
            ))),
        }
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), DpopError> {
        let ok = if self.ec {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &self.bytes).verify(message, signature)
        } else {
            UnparsedPublicKey::new(&ED25519, &self.bytes).verify(message, signature)
        };
        ok.map_err(|_| DpopError::Signature)
    }
}

/// RFC 7638: base64url of SHA-256 over the key's required members, in
/// lexicographic order, without white space (`canonical` is that JSON).
fn thumbprint(canonical: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

/// The RFC 7638 thumbprint of a public JWK (ES256 P-256 or Ed25519), as
/// `cnf.jkt` holds it: for an agent that sends its key instead of a proof
/// (the gRPC `IssueToken`).
pub fn jwk_thumbprint(jwk: &Value) -> Result<String, DpopError> {
    let alg = match jwk.get("kty").and_then(Value::as_str) {
        Some("EC") => "ES256",
        Some("OKP") => "EdDSA",
        _ => return Err(DpopError::Key("kty must be EC or OKP".into())),
    };
    Ok(PublicKey::from_jwk(jwk, alg)?.thumbprint)
}

/// The `jti`s of proofs seen within the window, so each proof is good for
/// one request. Bounded: at capacity it refuses new proofs (`Busy`) until
/// old ones age out, rather than forget one that could be replayed.
#[derive(Debug)]
pub struct ReplayCache {
    seen: Mutex<HashMap<(String, String), u64>>,
    capacity: usize,
}

impl ReplayCache {
    /// A cache remembering at most `capacity` proofs.
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// Records `proof` as used at `now`; `Replayed` if it was already.
    pub fn check(&self, proof: &Proof, now: Timestamp) -> Result<(), DpopError> {
        let window = MAX_PROOF_AGE.as_secs();
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (proof.jkt.clone(), proof.jti.clone());
        if seen.contains_key(&key) {
            return Err(DpopError::Replayed);
        }
        if seen.len() >= self.capacity {
            // A proof is accepted until `iat + window`: keep it that long.
            let now = now.as_secs();
            seen.retain(|_, iat| iat.saturating_add(window) >= now);
            if seen.len() >= self.capacity {
                return Err(DpopError::Busy);
            }
        }
        seen.insert(key, proof.iat);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
    use serde_json::json;

    use super::*;

    const URL: &str = "https://broker.example:8711/oauth2/token";

    /// A P-256 key and its public JWK.
    fn ec_key() -> (EcdsaKeyPair, Value) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = key.public_key().as_ref();
        let jwk = json!({
            "kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        });
        (key, jwk)
    }

    fn sign(key: &EcdsaKeyPair, header: &Value, claims: &Value) -> String {
        let h = URL_SAFE_NO_PAD.encode(header.to_string());
        let c = URL_SAFE_NO_PAD.encode(claims.to_string());
        let input = format!("{h}.{c}");
        let sig = key.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    fn request(now: u64, token: Option<&str>) -> Request<'_> {
        Request {
            method: "POST",
            url: URL,
            access_token: token,
            now: Timestamp::from_secs(now),
        }
    }

    #[test]
    fn thumbprints_match_rfc_8037() {
        // RFC 8037 appendix A.3.
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        assert_eq!(
            jwk_thumbprint(&jwk).unwrap(),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn a_good_proof_passes_and_each_bad_one_is_named() {
        let (key, jwk) = ec_key();
        let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk});
        let claims = json!({"jti": "j1", "htm": "POST", "htu": URL, "iat": 1000});
        let good = sign(&key, &header, &claims);
        let proof = verify_proof(&good, &request(1010, None)).unwrap();
        assert_eq!(proof.jkt, jwk_thumbprint(&jwk).unwrap());
        // The URL as a client may write it.
        let loose = sign(
            &key,
            &header,
            &json!({"jti": "j", "htm": "POST", "htu": "HTTPS://Broker.example:8711/oauth2/token?x=1", "iat": 1000}),
        );
        assert!(verify_proof(&loose, &request(1000, None)).is_ok());

        let with = |f: &dyn Fn(&mut Value, &mut Value)| {
            let (mut h, mut c) = (header.clone(), claims.clone());
            f(&mut h, &mut c);
            sign(&key, &h, &c)
        };
        let cases: Vec<(String, DpopError)> = vec![
            (with(&|h, _| h["typ"] = json!("JWT")), DpopError::Type),
            (
                with(&|h, _| h["alg"] = json!("HS256")),
                DpopError::Algorithm("HS256".into()),
            ),
            (
                with(&|h, _| h["alg"] = json!("none")),
                DpopError::Algorithm("none".into()),
            ),
            (
                with(&|_, c| c["htm"] = json!("GET")),
                DpopError::Method {
                    got: "GET".into(),
                    want: "POST".into(),
                },
            ),
            (
                with(&|_, c| c["htu"] = json!("https://evil.example/oauth2/token")),
                DpopError::Url {
                    got: "https://evil.example/oauth2/token".into(),
                    want: URL.into(),
                },
            ),
            (with(&|_, c| c["iat"] = json!(900)), DpopError::Stale(110)),
            (with(&|_, c| c["iat"] = json!(1200)), DpopError::Future(190)),
        ];
        for (proof, want) in cases {
            assert_eq!(verify_proof(&proof, &request(1010, None)), Err(want));
        }
        // Signed by another key than the one in the header.
        let (other, _) = ec_key();
        let forged = sign(&other, &header, &claims);
        assert_eq!(
            verify_proof(&forged, &request(1010, None)),
            Err(DpopError::Signature)
        );
        // A private key in the header.
        let mut private = header.clone();
        private["jwk"]["d"] = json!("AAAA");
        assert!(matches!(
            verify_proof(&sign(&key, &private, &claims), &request(1010, None)),
            Err(DpopError::Key(_))
        ));

        // With an access token: ath must be its hash.
        let token = "eyJ.eyJ.sig";
        let ath = URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            token.as_bytes(),
        ));
        assert_eq!(
            verify_proof(&good, &request(1010, Some(token))),
            Err(DpopError::MissingAth)
        );
        let wrong = with(&|_, c| c["ath"] = json!("x"));
        assert_eq!(
            verify_proof(&wrong, &request(1010, Some(token))),
            Err(DpopError::WrongAth)
        );
        let right = with(&|_, c| c["ath"] = json!(ath));
        assert!(verify_proof(&right, &request(1010, Some(token))).is_ok());
    }

    #[test]
    fn ed25519_proofs_verify() {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(key.public_key().as_ref())});
        let h = URL_SAFE_NO_PAD
            .encode(json!({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": jwk}).to_string());
        let c = URL_SAFE_NO_PAD
            .encode(json!({"jti": "e", "htm": "POST", "htu": URL, "iat": 5}).to_string());
        let input = format!("{h}.{c}");
        let proof = format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(key.sign(input.as_bytes()).as_ref())
        );
        let ok = verify_proof(&proof, &request(5, None)).unwrap();
        assert_eq!(ok.jkt, jwk_thumbprint(&jwk).unwrap());
        // An EC key claimed as EdDSA.
        let (_, ec) = ec_key();
        let h = URL_SAFE_NO_PAD
            .encode(json!({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": ec}).to_string());
        assert!(matches!(
            verify_proof(&format!("{h}.{c}.AAAA"), &request(5, None)),
            Err(DpopError::Key(_))
        ));
    }

    #[test]
    fn a_proof_is_good_for_one_request_and_the_cache_stays_bounded() {
        let cache = ReplayCache::new(2);
        let p = |jti: &str, iat: u64| Proof {
            jkt: "k".into(),
            jti: jti.into(),
            iat,
        };
        let now = Timestamp::from_secs(100);
        cache.check(&p("a", 100), now).unwrap();
        assert_eq!(cache.check(&p("a", 100), now), Err(DpopError::Replayed));
        cache.check(&p("b", 100), now).unwrap();
        // Full of live proofs: refused, not forgotten.
        assert_eq!(cache.check(&p("c", 100), now), Err(DpopError::Busy));
        // Once they are past the window, room again; a old jti is still
        // refused by the iat window itself.
        let later = Timestamp::from_secs(100 + MAX_PROOF_AGE.as_secs() + 1);
        cache.check(&p("c", later.as_secs()), later).unwrap();
    }
}
