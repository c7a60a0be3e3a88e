//! Workload identity without a client certificate: signed tokens of the
//! issuers `[[federation]]` trusts (Kubernetes projected service-account
//! tokens, cloud and CI OIDC tokens, SPIFFE JWT-SVIDs). A token is an
//! identity only if every check holds, and a refusal names the one that
//! failed:
//!
//! - a compact JWS of at most [`MAX_TOKEN_BYTES`], whose `alg` is one the
//!   issuer's entry allows (never `none`, never a symmetric one);
//! - its `iss` names a configured issuer (a JWT-SVID without `iss` goes to
//!   the entry without one), and its `kid` is one of *that* issuer's keys
//!   (fetched again, rate limited, for an unknown `kid`), of the same
//!   algorithm, and the signature verifies;
//! - it has `exp` (not passed), `iat` (no older than the entry's `max_age`),
//!   `nbf` if any (reached), and the entry's audience in `aud`;
//! - the entry's required claims hold, `sub` matches the entry's pattern,
//!   and the SPIFFE ID it maps to is of the broker's trust domain and not
//!   a task's.
//!
//! A token with a `jti` is accepted once per broker cluster within its
//! lifetime (unless its entry says `single_use = false`): the store
//! records it beside the lease records, where every replica sees it (`first_use`). The gRPC edge accepts it for the one
//! connection it was first presented on (see `auth`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use mayfly_core::{SpiffeId, Timestamp, TrustDomain};
use mayfly_verify::{Jwks, VerifyError};
use serde_json::Value;

use crate::cause::Cause;
use crate::config::FederationConfig;

/// Largest token accepted.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Clock leeway for `exp`, `nbf` and `iat`.
const LEEWAY: Duration = Duration::from_secs(30);

/// Why a token is not an identity. Each names the check that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a compact JWS, or too large.
    #[error("workload token is malformed: {0}")]
    Malformed(String),
    /// `alg: none`.
    #[error("workload token is unsigned (alg none)")]
    Unsigned,
    /// An algorithm the issuer's entry does not allow (symmetric ones
    /// never are).
    #[error("workload token algorithm {0} is not allowed for its issuer")]
    Algorithm(String),
    /// No configured issuer has this `iss`.
    #[error("workload token issuer {0:?} is not trusted ([[federation]])")]
    UnknownIssuer(String),
    /// No `kid` in the header.
    #[error("workload token names no key (kid)")]
    NoKeyId,
    /// The `kid` is not one of the issuer's keys.
    #[error("workload token key {kid:?} is not one of issuer {issuer:?}'s keys")]
    UnknownKey {
        /// The token's `kid`.
        kid: String,
        /// The issuer it claims.
        issuer: String,
    },
    /// The key signs with another algorithm than the header says.
    #[error("workload token says {token} but key {kid:?} is {key}")]
    KeyAlgorithm {
        /// The `kid`.
        kid: String,
        /// The header's `alg`.
        token: String,
        /// The key's.
        key: String,
    },
    /// The signature does not verify.
    #[error("workload token signature does not verify")]
    BadSignature,
    /// No `exp`.
    #[error("workload token has no expiry (exp)")]
    NoExpiry,
    /// `exp` passed.
    #[error("workload token has expired")]
    Expired,
    /// `nbf` not reached.
    #[error("workload token is not valid yet (nbf)")]
    NotYetValid,
    /// No `iat`.
    #[error("workload token has no issue time (iat)")]
    NoIssuedAt,
    /// Older than the entry's `max_age`.
    #[error("workload token is {age}s old; at most {max}s is accepted")]
    TooOld {
        /// Its age, seconds.
        age: u64,
        /// The limit.
        max: u64,
    },
    /// `aud` lacks the entry's audience.
    #[error("workload token audience is not {0:?}")]
    WrongAudience(String),
    /// A required claim is missing or differs.
    #[error("workload token claim {0:?} does not have the required value")]
    Claim(String),
    /// `sub` does not match the entry's pattern.
    #[error("workload token subject {0:?} does not match the issuer's subject pattern")]
    Subject(String),
    /// The mapped SPIFFE ID is not acceptable.
    #[error("workload token maps to {id:?}, which is refused: {reason}")]
    Mapping {
        /// What the mapping produced.
        id: String,
        /// Why it is refused.
        reason: String,
    },
    /// The `jti` was seen before.
    #[error("workload token {0:?} was already used (jti replay)")]
    Replayed(String),
    /// The issuer's keys could not be fetched.
    #[error("workload token issuer's keys are unavailable: {0}")]
    KeysUnavailable(String),
    /// The store could not say whether the `jti` was used before; the
    /// token is refused (fail closed) and may be tried again.
    #[error("workload token replay check unavailable (lease store); try again")]
    ReplayCheckUnavailable,
}

impl TokenError {
    /// The token could not be checked now (its issuer's keys or the replay
    /// record out of reach): not the client's fault, and a retry may pass.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::KeysUnavailable(_) | Self::ReplayCheckUnavailable
        )
    }
}

/// A caller proven by a workload token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    /// The SPIFFE ID the token maps to.
    pub id: SpiffeId,
    /// The issuer that vouched for it (its entry's `issuer`, or
    /// `spiffe://<trust domain>` for JWT-SVIDs without one).
    pub issuer: String,
    /// Until when the caller is good: the token's `exp`, or the moment it
    /// grows older than its issuer's `max_age`, whichever comes first.
    pub expires_at: Timestamp,
    /// Its `jti`, for the replay check: `None` if it has none or its
    /// issuer's tokens are not single-use.
    pub jti: Option<String>,
}

/// A part of a `subject` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Name(String),
}

/// The literal text every ID a `spiffe_id` template makes starts with.
fn id_prefix(template: &[Part]) -> String {
    match template.first() {
        Some(Part::Literal(l)) => l.clone(),
        _ => String::new(),
    }
}

/// What is wrong with a `subject` or `spiffe_id` template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// A `{` with no `}` after it.
    #[error("{0:?}: unclosed '{{'")]
    Unclosed(String),
    /// A name that is empty or not `[A-Za-z0-9_]`.
    #[error("{template:?}: bad name {{{name}}}")]
    BadName {
        /// The template.
        template: String,
        /// The name between the braces.
        name: String,
    },
    /// Two names with no literal between them (where would the first end?).
    #[error("{0:?}: two names in a row")]
    NamesInARow(String),
    /// A `}` with no `{` before it.
    #[error("{0:?}: '}}' without '{{'")]
    Unopened(String),
}

/// Splits `{name}` placeholders from literals; two names in a row (no
/// literal to end the first) are refused.
fn parse_template(t: &str) -> Result<Vec<Part>, TemplateError> {
    let mut parts = Vec::new();
    let mut rest = t;
    while !rest.is_empty() {
        match rest.find('{') {
            Some(0) => {
                let end = rest
                    .find('}')
                    .ok_or_else(|| TemplateError::Unclosed(t.to_owned()))?;
                let name = &rest[1..end];
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(TemplateError::BadName {
                        template: t.to_owned(),
                        name: name.to_owned(),
                    });
                }
                if matches!(parts.last(), Some(Part::Name(_))) {
                    return Err(TemplateError::NamesInARow(t.to_owned()));
                }
                parts.push(Part::Name(name.to_owned()));
                rest = &rest[end + 1..];
            }
            Some(i) => {
                parts.push(Part::Literal(rest[..i].to_owned()));
                rest = &rest[i..];
            }
            None => {
                parts.push(Part::Literal(rest.to_owned()));
                rest = "";
            }
        }
    }
    if t.contains('}') && parts.iter().all(|p| matches!(p, Part::Literal(_))) {
        return Err(TemplateError::Unopened(t.to_owned()));
    }
    Ok(parts)
}

/// Whether a captured value may go into a SPIFFE ID: one path segment of
/// letters, digits, `.`, `-`, `_` (not `.` or `..`).
fn safe_segment(v: &str) -> bool {
    !v.is_empty()
        && v != "."
        && v != ".."
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

/// Matches `sub` against a pattern: each name takes up to the next
/// literal (or the rest, last).
fn capture(pattern: &[Part], sub: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut rest = sub;
    let mut parts = pattern.iter().peekable();
    while let Some(p) = parts.next() {
        match p {
            Part::Literal(l) => rest = rest.strip_prefix(l.as_str())?,
            Part::Name(n) => {
                let value = match parts.peek() {
                    Some(Part::Literal(next)) => {
                        let i = rest.find(next.as_str())?;
                        let (v, r) = rest.split_at(i);
                        rest = r;
                        v
                    }
                    _ => std::mem::take(&mut rest),
                };
                out.insert(n.clone(), value.to_owned());
            }
        }
    }
    rest.is_empty().then_some(out)
}

/// One `[[federation]]` entry, ready to check tokens.
#[derive(Debug)]
struct Issuer {
    /// `iss`, or `None` for JWT-SVIDs without one.
    iss: Option<String>,
    /// The name audit records and policy see.
    name: String,
    keys: Jwks,
    audience: String,
    algorithms: Vec<Algorithm>,
    max_age: Duration,
    /// Whether a `jti` is accepted once only.
    single_use: bool,
    /// For keys fetched from a URL: how often to fetch them regardless.
    max_key_age: Option<Duration>,
    /// Keys pushed by the Workload API: `Some(false)` until the first
    /// bundle arrives.
    pushed: Option<std::sync::atomic::AtomicBool>,
    subject: Vec<Part>,
    spiffe_id: Vec<Part>,
    claims: BTreeMap<String, String>,
}

/// Why the `[[federation]]` configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("[[federation]] {entry}: {reason}")]
pub struct FederationConfigError {
    /// The entry's `issuer`, or what stands for it.
    entry: String,
    /// What is wrong with it, and the error under it if there is one
    /// (a template's, an unreadable file's, the keys').
    #[source]
    reason: Cause,
}

impl FederationConfigError {
    fn new(entry: &str, reason: Cause) -> Self {
        Self {
            entry: entry.to_owned(),
            reason,
        }
    }
}

/// The trusted issuers.
#[derive(Debug, Default)]
pub struct Federation {
    issuers: Vec<Issuer>,
    trust_domain: Option<TrustDomain>,
}

/// A JWS algorithm `[[federation]]` does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "algorithm {0:?} is not accepted; use RS256/384/512, PS256/384/512, ES256/384 or EdDSA \
     (asymmetric only)"
)]
pub struct UnknownAlgorithm(String);

fn algorithm(name: &str) -> Result<Algorithm, UnknownAlgorithm> {
    match name {
        "RS256" => Ok(Algorithm::RS256),
        "RS384" => Ok(Algorithm::RS384),
        "RS512" => Ok(Algorithm::RS512),
        "PS256" => Ok(Algorithm::PS256),
        "PS384" => Ok(Algorithm::PS384),
        "PS512" => Ok(Algorithm::PS512),
        "ES256" => Ok(Algorithm::ES256),
        "ES384" => Ok(Algorithm::ES384),
        "EdDSA" => Ok(Algorithm::EdDSA),
        other => Err(UnknownAlgorithm(other.to_owned())),
    }
}

impl Federation {
    /// Checks every entry and loads its keys (JWKS files and bundles now;
    /// JWKS URLs at the first [`Federation::fetch_all`] or unknown `kid`).
    /// `audience` is the default audience (the broker's issuer URL).
    pub fn load(
        configs: &[FederationConfig],
        audience: &str,
        trust_domain: &TrustDomain,
    ) -> Result<Self, FederationConfigError> {
        let mut issuers: Vec<Issuer> = Vec::new();
        // The literal start of each (non-JWT-SVID) entry's SPIFFE IDs.
        let mut prefixes: Vec<(String, String)> = Vec::new();
        for c in configs {
            let entry = c
                .issuer
                .clone()
                .unwrap_or_else(|| "(JWT-SVIDs without iss)".into());
            let fail = |reason: String| FederationConfigError::new(&entry, Cause::msg(reason));
            let cause = |reason: Cause| FederationConfigError::new(&entry, reason);
            if c.issuer.is_none() && c.spiffe_bundle.is_none() && !c.workload_api {
                return Err(fail(
                    "needs issuer (only JWT-SVIDs, from spiffe_bundle or workload_api, may come \
                     without)"
                        .into(),
                ));
            }
            let algorithms = c
                .algorithms
                .iter()
                .map(|a| algorithm(a))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| cause(Cause::of(e)))?;
            if algorithms.is_empty() {
                return Err(fail("algorithms is empty".into()));
            }
            let read =
                |p: &Path| std::fs::read(p).map_err(|e| cause(Cause::context(p.display(), e)));
            let keys = match (&c.jwks_url, &c.jwks_file, &c.spiffe_bundle) {
                // Empty until the Workload API sends the bundle.
                (None, None, None) if c.workload_api => {
                    Jwks::fixed(br#"{"keys":[]}"#, &algorithms).map_err(|e| cause(Cause::of(e)))?
                }
                _ if c.workload_api => {
                    return Err(fail(
                        "workload_api takes its keys from the Workload API: remove jwks_url, \
                         jwks_file and spiffe_bundle"
                            .into(),
                    ));
                }
                (Some(url), None, None) => {
                    let ca = c.ca.as_deref().ok_or_else(|| {
                        fail("jwks_url needs ca (the JWKS server's CA, PEM)".into())
                    })?;
                    Jwks::https(url, read(ca)?, c.jwks_refresh, &algorithms)
                        .map_err(|e| cause(Cause::of(e)))?
                }
                (None, Some(file), None) | (None, None, Some(file)) => {
                    Jwks::fixed(&read(file)?, &algorithms).map_err(|e| cause(Cause::of(e)))?
                }
                _ => {
                    return Err(fail(
                        "needs exactly one of jwks_url (with ca), jwks_file, spiffe_bundle and \
                         workload_api = true"
                            .into(),
                    ));
                }
            };
            if issuers.iter().any(|i| i.iss == c.issuer) {
                return Err(fail("the same issuer is configured twice".into()));
            }
            let template = |t: Option<&str>| {
                parse_template(t.unwrap_or("{sub}")).map_err(|e| cause(Cause::of(e)))
            };
            let subject = template(c.subject.as_deref())?;
            let spiffe_id = template(c.spiffe_id.as_deref())?;
            for p in &spiffe_id {
                if let Part::Name(n) = p
                    && !subject.contains(p)
                {
                    return Err(fail(format!(
                        "spiffe_id names {{{n}}}, which subject does not capture"
                    )));
                }
            }
            // Two issuers that can map to the same SPIFFE ID would be the
            // same agent (its tasks, its leases). JWT-SVIDs are exempt:
            // SPIRE is the trust domain's authority for its IDs.
            let jwt_svids = c.spiffe_bundle.is_some() || c.workload_api;
            if !jwt_svids {
                let prefix = id_prefix(&spiffe_id);
                if let Some(other) = prefixes
                    .iter()
                    .find(|(p, _)| p.starts_with(&prefix) || prefix.starts_with(p.as_str()))
                {
                    return Err(fail(format!(
                        "its SPIFFE IDs ({prefix}…) can be those of issuer {:?} ({}…): give each \
                         issuer its own path in spiffe_id",
                        other.1, other.0
                    )));
                }
                prefixes.push((prefix, entry.clone()));
            }
            let name = c.issuer.clone().unwrap_or_else(|| trust_domain.id_string());
            // Policy and the audit trail tell callers apart by this name.
            if name == mayfly_core::Proof::CERTIFICATE || issuers.iter().any(|i| i.name == name) {
                return Err(fail(format!(
                    "issuer name {name:?} is taken (by another entry, or by certificate callers)"
                )));
            }
            if c.jwks_refresh < Duration::from_secs(1) || c.jwks_max_age < Duration::from_secs(1) {
                return Err(fail(
                    "jwks_refresh and jwks_max_age must be at least 1s".into(),
                ));
            }
            issuers.push(Issuer {
                iss: c.issuer.clone(),
                name,
                keys,
                audience: c.audience.clone().unwrap_or_else(|| audience.to_owned()),
                algorithms,
                max_age: c.max_age,
                single_use: c.single_use,
                max_key_age: c.jwks_url.as_ref().map(|_| c.jwks_max_age),
                pushed: c
                    .workload_api
                    .then(|| std::sync::atomic::AtomicBool::new(false)),
                subject,
                spiffe_id,
                claims: c.claims.clone(),
            });
        }
        Ok(Self {
            issuers,
            trust_domain: Some(trust_domain.clone()),
        })
    }

    /// Fetches every issuer's JWKS now, then each `jwks_url` again every
    /// `jwks_max_age`, so a key the issuer withdrew stops verifying without
    /// waiting for a token with an unknown `kid`. Runs until dropped.
    pub async fn keep_fresh(&self) {
        self.fetch_all().await;
        let due: Vec<(&Issuer, Duration)> = self
            .issuers
            .iter()
            .filter_map(|i| i.max_key_age.map(|a| (i, a)))
            .collect();
        if due.is_empty() {
            return;
        }
        let mut last: Vec<std::time::Instant> = vec![std::time::Instant::now(); due.len()];
        // `jwks_max_age` is at least a second: looking once a second is
        // enough for each entry to be fetched when it is due.
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for ((issuer, age), at) in due.iter().zip(last.iter_mut()) {
                if at.elapsed() < *age {
                    continue;
                }
                *at = std::time::Instant::now();
                if let Err(e) = issuer.keys.refresh(true).await {
                    tracing::warn!(issuer = %issuer.name, error = %e, "workload token issuer's JWKS refresh failed; the keys in hand stay");
                }
            }
        }
    }

    /// Whether an entry takes its keys from the Workload API.
    pub fn wants_workload_bundle(&self) -> bool {
        self.issuers.iter().any(|i| i.pushed.is_some())
    }

    /// Replaces the keys of the entries that take them from the Workload
    /// API with `document`, the JWT bundle (a JWKS) of the broker's trust
    /// domain; returns how many keys are usable. A document that does not
    /// parse changes nothing.
    pub fn set_workload_bundle(&self, document: &[u8]) -> Result<usize, VerifyError> {
        let mut usable = 0;
        for i in &self.issuers {
            if let Some(pushed) = &i.pushed {
                usable = i.keys.replace(document)?;
                pushed.store(true, std::sync::atomic::Ordering::Release);
            }
        }
        Ok(usable)
    }

    /// Fetches every issuer's JWKS now; failures are logged (their tokens
    /// are refused until a fetch succeeds).
    pub async fn fetch_all(&self) {
        for i in &self.issuers {
            if let Err(e) = i.keys.refresh(true).await {
                tracing::warn!(issuer = %i.name, error = %e, "workload token issuer's JWKS unavailable");
            }
        }
    }

    /// Verifies `token` and maps it to a caller.
    pub async fn verify(&self, token: &str) -> Result<TokenIdentity, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed(format!(
                "{} bytes; at most {MAX_TOKEN_BYTES}",
                token.len()
            )));
        }
        let mut segments = token.split('.');
        let (Some(header), Some(payload), Some(_), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(TokenError::Malformed("not a compact JWS".into()));
        };
        let header: Value = decode_part(header)?;
        let alg = header["alg"]
            .as_str()
            .ok_or_else(|| TokenError::Malformed("no alg".into()))?;
        if alg.eq_ignore_ascii_case("none") {
            return Err(TokenError::Unsigned);
        }
        // The claims, unverified, only to pick the issuer's entry.
        let unverified: Value = decode_part(payload)?;
        let iss = unverified.get("iss").and_then(Value::as_str);
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.iss.as_deref() == iss)
            .ok_or_else(|| TokenError::UnknownIssuer(iss.unwrap_or("").to_owned()))?;
        let alg = algorithm(alg)
            .ok()
            .filter(|a| issuer.algorithms.contains(a))
            .ok_or_else(|| TokenError::Algorithm(alg.to_owned()))?;
        let kid = header["kid"].as_str().ok_or(TokenError::NoKeyId)?;
        let key = match issuer.keys.get(kid) {
            Some(k) => k,
            None if issuer
                .pushed
                .as_ref()
                .is_some_and(|p| !p.load(std::sync::atomic::Ordering::Acquire)) =>
            {
                return Err(TokenError::KeysUnavailable(
                    "the SPIFFE Workload API has not sent the JWT bundle yet".into(),
                ));
            }
            None => {
                issuer.keys.refresh(false).await.map_err(|e| {
                    // The details (hosts, TLS errors) are for the log,
                    // not for whoever sent the token.
                    tracing::warn!(issuer = %issuer.name, error = %e, "workload token issuer's keys unavailable");
                    TokenError::KeysUnavailable("could not fetch the issuer's keys".into())
                })?;
                issuer.keys.get(kid).ok_or_else(|| TokenError::UnknownKey {
                    kid: kid.to_owned(),
                    issuer: issuer.name.clone(),
                })?
            }
        };
        if key.alg != alg {
            return Err(TokenError::KeyAlgorithm {
                kid: kid.to_owned(),
                token: format!("{alg:?}"),
                key: format!("{:?}", key.alg),
            });
        }
        let mut v = Validation::new(alg);
        v.leeway = LEEWAY.as_secs();
        v.validate_nbf = true;
        v.validate_aud = false;
        v.set_required_spec_claims(&["exp"]);
        let claims: Value = jsonwebtoken::decode::<Value>(token, &key.key, &v)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::MissingRequiredClaim(c) if c == "exp" => TokenError::NoExpiry,
                ErrorKind::InvalidAlgorithm => TokenError::Algorithm(format!("{alg:?}")),
                other => TokenError::Malformed(format!("{other:?}")),
            })?
            .claims;
        issuer.check_claims(&claims, self.trust_domain.as_ref())
    }
}

fn decode_part(part: &str) -> Result<Value, TokenError> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed("bad base64url".into()))?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed("bad JSON".into()))
}

impl Issuer {
    /// The checks after the signature: age, audience, claims, mapping.
    fn check_claims(
        &self,
        claims: &Value,
        trust_domain: Option<&TrustDomain>,
    ) -> Result<TokenIdentity, TokenError> {
        let now = Timestamp::now().as_secs();
        let exp = claims["exp"].as_u64().ok_or(TokenError::NoExpiry)?;
        // The signature check allows clock skew past `exp`; a caller is
        // not made from a token already expired here.
        if exp <= now {
            return Err(TokenError::Expired);
        }
        let iat = claims["iat"].as_u64().ok_or(TokenError::NoIssuedAt)?;
        if iat > now + LEEWAY.as_secs() {
            return Err(TokenError::NotYetValid);
        }
        let age = now.saturating_sub(iat);
        if age > self.max_age.as_secs() {
            return Err(TokenError::TooOld {
                age,
                max: self.max_age.as_secs(),
            });
        }
        let aud_ok = match &claims["aud"] {
            Value::String(a) => *a == self.audience,
            Value::Array(list) => list.iter().any(|a| a.as_str() == Some(&self.audience)),
            _ => false,
        };
        if !aud_ok {
            return Err(TokenError::WrongAudience(self.audience.clone()));
        }
        for (name, want) in &self.claims {
            if claims[name].as_str() != Some(want.as_str()) {
                return Err(TokenError::Claim(name.clone()));
            }
        }
        let sub = claims["sub"]
            .as_str()
            .ok_or_else(|| TokenError::Subject(String::new()))?;
        let id = self.map(sub)?;
        let refuse = |reason: &str| TokenError::Mapping {
            id: id.to_string(),
            reason: reason.to_owned(),
        };
        if trust_domain.is_some_and(|td| id.trust_domain() != *td) {
            return Err(refuse("not of the broker's trust domain"));
        }
        if id.is_task_bound() {
            return Err(refuse("a task's SPIFFE ID is never a caller"));
        }
        Ok(TokenIdentity {
            id,
            issuer: self.name.clone(),
            // Good until `exp`, and never past the oldest age accepted.
            expires_at: Timestamp::from_secs(exp.min(iat.saturating_add(self.max_age.as_secs()))),
            jti: claims["jti"]
                .as_str()
                .filter(|_| self.single_use)
                .map(str::to_owned),
        })
    }

    /// The SPIFFE ID `sub` maps to.
    fn map(&self, sub: &str) -> Result<SpiffeId, TokenError> {
        let parts = capture(&self.subject, sub).ok_or_else(|| TokenError::Subject(sub.into()))?;
        // `{sub}` → `{sub}`: the subject is a SPIFFE ID itself (JWT-SVIDs).
        let whole = self.subject == self.spiffe_id && self.subject.len() == 1;
        let mut id = String::new();
        for p in &self.spiffe_id {
            match p {
                Part::Literal(l) => id.push_str(l),
                Part::Name(n) => {
                    let v = parts.get(n).map(String::as_str).unwrap_or_default();
                    // Otherwise each captured part is one safe path
                    // segment, so a subject cannot climb or add segments.
                    if !whole && !safe_segment(v) {
                        return Err(TokenError::Mapping {
                            id: v.to_owned(),
                            reason: format!("{{{n}}} is not one path segment of [A-Za-z0-9._-]"),
                        });
                    }
                    id.push_str(v);
                }
            }
        }
        SpiffeId::new(&id).map_err(|e| TokenError::Mapping {
            id: id.clone(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_capture_parts_up_to_the_next_literal() {
        let p = parse_template("system:serviceaccount:{ns}:{sa}").unwrap();
        let got = capture(&p, "system:serviceaccount:prod:billing").unwrap();
        assert_eq!(got["ns"], "prod");
        assert_eq!(got["sa"], "billing");
        assert!(capture(&p, "system:node:prod:billing").is_none());
        let gh = parse_template("repo:octo-org/{repo}:ref:refs/heads/{branch}").unwrap();
        let got = capture(&gh, "repo:octo-org/api:ref:refs/heads/main").unwrap();
        assert_eq!(
            (got["repo"].as_str(), got["branch"].as_str()),
            ("api", "main")
        );
        assert!(capture(&gh, "repo:evil-org/api:ref:refs/heads/main").is_none());
        for bad in ["{a}{b}", "{", "x{a-b}", "a}b"] {
            assert!(parse_template(bad).is_err(), "{bad}");
        }
        assert!(safe_segment("billing-v2.1_x"));
        for bad in ["", ".", "..", "a/b", "a:b", "a%2f"] {
            assert!(!safe_segment(bad), "{bad}");
        }
    }

    /// A template's error names the template and what is wrong; an entry's
    /// error keeps it as its source.
    #[test]
    fn template_errors_say_what_is_wrong_and_stay_under_the_entrys() {
        let cases = [
            ("{a}{b}", r#""{a}{b}": two names in a row"#),
            ("x{", r#""x{": unclosed '{'"#),
            ("x{a-b}", r#""x{a-b}": bad name {a-b}"#),
            ("a}b", r#""a}b": '}' without '{'"#),
        ];
        for (template, message) in cases {
            assert_eq!(parse_template(template).unwrap_err().to_string(), message);
        }
        let e = FederationConfigError::new(
            "https://token.actions.githubusercontent.com",
            Cause::of(parse_template("{a}{b}").unwrap_err()),
        );
        assert_eq!(
            e.to_string(),
            r#"[[federation]] https://token.actions.githubusercontent.com: "{a}{b}": two names in a row"#
        );
        let under = std::error::Error::source(&e).and_then(std::error::Error::source);
        assert_eq!(
            under.and_then(|s| s.downcast_ref::<TemplateError>()),
            Some(&TemplateError::NamesInARow("{a}{b}".into()))
        );
        assert_eq!(
            algorithm("HS256").unwrap_err().to_string(),
            "algorithm \"HS256\" is not accepted; use RS256/384/512, PS256/384/512, ES256/384 \
             or EdDSA (asymmetric only)"
        );
    }
}
