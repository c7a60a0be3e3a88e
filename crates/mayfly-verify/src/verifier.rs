//! [`Verifier`]: every check a downstream service needs on a Mayfly access
//! token, in the order RFC 8725 asks for: algorithm allow-list and `typ`
//! before any key is used, the key's own algorithm, signature, exact `iss`,
//! own `aud`, `exp`/`nbf` with bounded leeway, binding (the client
//! certificate, RFC 8705, or a DPoP key, RFC 9449, whose proof must be
//! for this request and used once), and revocation from the live feed
//! (failing closed when the feed is silent) or the Token Status Lists
//! (failing closed when a list is older than its `ttl`).

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use mayfly_core::dpop::{DpopError, ReplayCache, Request as ProofRequest, verify_proof};
use mayfly_core::status_list::StatusClaim;
use mayfly_core::{ActorClaim, LeaseId, SpiffeId, TaskId};
use serde::Deserialize;

use crate::VerifyError;
use crate::cert::{PeerCertError, TaskIdentity, parse_task_certificate};
use crate::config::{MAX_LEEWAY, VerifierConfig};
use crate::feed::{self, RevocationSet};
use crate::jwks::{Fetcher, Jwks, JwksError};
use crate::material::Material;
use crate::report::RequestReports;
use crate::status::{self, StatusLists};

/// A token that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The agent the work is for (`sub`): the owner of the root task when
    /// the task was delegated.
    pub agent: SpiffeId,
    /// The task the token belongs to.
    pub task_id: TaskId,
    /// The lease (`jti`).
    pub lease_id: LeaseId,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// This service's audience.
    pub audience: String,
    /// Expiry, seconds since the epoch.
    pub expires_at: u64,
    /// Delegation chain (RFC 8693 `act`), outermost = current actor.
    pub actor: Option<ActorClaim>,
    /// The bound certificate's thumbprint, when bound to one.
    pub bound_to: Option<String>,
    /// The DPoP key's thumbprint (`cnf.jkt`), when bound to one.
    pub dpop_key: Option<String>,
}

/// A DPoP-bound token's request: the proof that came with it, and the
/// request it must be for.
#[derive(Debug, Clone, Copy)]
pub struct DpopRequest<'a> {
    /// The `DPoP` header.
    pub proof: &'a str,
    /// The HTTP method.
    pub method: &'a str,
    /// The request URL as the client addressed it (scheme, host, path).
    pub url: &'a str,
}

/// How a token came: as a bearer token, or with a DPoP proof.
#[derive(Debug, Clone, Copy)]
enum Presented<'a> {
    Bearer,
    Dpop(DpopRequest<'a>),
}

impl VerifiedToken {
    /// The agent presenting the token: the current actor of a delegated
    /// task, else the subject.
    pub fn actor_id(&self) -> &str {
        self.actor
            .as_ref()
            .map_or(self.agent.as_str(), |a| a.sub.as_str())
    }

    /// Whether the token grants `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

#[derive(Deserialize)]
struct Header {
    alg: Option<String>,
    typ: Option<String>,
    kid: Option<String>,
}

#[derive(Deserialize, Clone)]
struct Claims {
    sub: String,
    aud: serde_json::Value,
    exp: u64,
    jti: String,
    task_id: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    cnf: Option<Cnf>,
    #[serde(default)]
    act: Option<ActorClaim>,
    #[serde(default)]
    status: Option<StatusClaim>,
}

#[derive(Deserialize, Clone)]
struct Cnf {
    #[serde(rename = "x5t#S256")]
    x5t_s256: Option<String>,
    jkt: Option<String>,
}

/// Verifies tokens for one audience. Cheap to clone and share.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    config: VerifierConfig,
    jwks: Arc<Jwks>,
    /// The Token Status Lists held, when read.
    status_lists: Option<Arc<StatusLists>>,
    /// Fed by the revocation feed; `None` when verifying offline.
    revoked: Option<Arc<RevocationSet>>,
    /// DPoP proofs already used: each is good for one request.
    dpop_seen: ReplayCache,
    /// Where the layer reports requests, when asked to.
    reports: Option<RequestReports>,
    /// Tokens whose signature and claims were checked already.
    decoded: DecodedCache,
}

/// A token whose header, signature, issuer, audience and claims were
/// checked: what is left for each request is its time, its key still
/// being published, its binding and its revocation.
struct Decoded {
    kid: String,
    claims: Claims,
}

/// Tokens decoded lately, by the SHA-256 of their text: a service sees the
/// same token on request after request, and its signature need not be
/// checked again. Two generations of [`DECODED_REMEMBERED`] each.
#[derive(Default)]
struct DecodedCache {
    generations: std::sync::Mutex<[std::collections::HashMap<[u8; 32], Arc<Decoded>>; 2]>,
}

/// Decoded tokens one generation holds.
const DECODED_REMEMBERED: usize = 8192;

impl DecodedCache {
    fn key(token: &str) -> [u8; 32] {
        let mut key = [0u8; 32];
        key.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
        key
    }

    fn get(&self, key: &[u8; 32]) -> Option<Arc<Decoded>> {
        let g = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        g[0].get(key).or_else(|| g[1].get(key)).cloned()
    }

    fn put(&self, key: [u8; 32], decoded: Arc<Decoded>) {
        let mut g = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        if g[0].len() >= DECODED_REMEMBERED {
            g[1] = std::mem::take(&mut g[0]);
        }
        g[0].insert(key, decoded);
    }
}

/// DPoP proofs remembered (each for a minute); beyond that new proofs are
/// refused rather than an old one forgotten.
const DPOP_PROOFS_REMEMBERED: usize = 100_000;

/// The algorithms Mayfly signs with: keys of others are ignored.
const MAYFLY_ALGORITHMS: &[Algorithm] = &[Algorithm::ES256, Algorithm::EdDSA];

impl Verifier {
    /// The issuer tokens must come from.
    pub fn issuer(&self) -> &str {
        &self.inner.config.issuer
    }

    /// The audience tokens must be for.
    pub fn audience(&self) -> &str {
        &self.inner.config.audience
    }
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.inner.config.issuer)
            .field("audience", &self.inner.config.audience)
            .finish_non_exhaustive()
    }
}

/// Whether any of `ids` is revoked, given the feed's state (`None`:
/// offline, nothing is known to be revoked).
fn set_revoked(
    state: Option<Result<&RevocationSet, VerifyError>>,
    ids: &[&str],
) -> Result<bool, VerifyError> {
    match state {
        None => Ok(false),
        Some(set) => {
            let set = set?;
            Ok(ids.iter().any(|id| set.is_revoked(id)))
        }
    }
}

/// The thumbprint RFC 8705 binds tokens to.
pub fn cert_thumbprint(cert_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, cert_der))
}

impl Verifier {
    /// Fetches the JWKS and, if configured, starts following the revocation
    /// feed. Fails if the JWKS cannot be fetched.
    pub async fn connect(mut config: VerifierConfig) -> Result<Self, VerifyError> {
        config.leeway = config.leeway.min(MAX_LEEWAY);
        let trust = match &config.workload_api {
            Some(endpoint) => Material::workload_api(endpoint)
                .await
                .map_err(JwksError::Trust)?,
            None => Material::Fixed {
                ca_pem: config.ca_pem.clone(),
                identity: config
                    .feed
                    .as_ref()
                    .map(|f| (f.cert_pem.clone(), f.key_pem.clone().into())),
            },
        };
        let jwks = Arc::new(Jwks::new(
            Fetcher::new(&config.jwks_url, trust.clone())?,
            config.jwks_refresh_interval,
            MAYFLY_ALGORITHMS,
        ));
        jwks.refresh(true).await?;
        let status_lists = config
            .status_lists
            .clone()
            .map(|c| Arc::new(StatusLists::new(&config.issuer, c, config.leeway)));
        if let Some(lists) = &status_lists {
            tokio::spawn(status::refresh(
                Arc::downgrade(lists),
                Arc::downgrade(&jwks),
            ));
        }
        let revoked = config
            .feed
            .as_ref()
            .map(|_| Arc::new(RevocationSet::default()));
        if let (Some(feed_config), Some(set)) = (&config.feed, &revoked) {
            tokio::spawn(feed::follow(
                feed_config.clone(),
                trust.clone(),
                Arc::downgrade(set),
            ));
        }
        let reports = match (&config.feed, config.report_requests) {
            (Some(feed_config), true) => {
                Some(RequestReports::start(feed_config.clone(), trust.clone()))
            }
            (None, true) => {
                tracing::warn!(
                    "request reports go as the feed's identity: without a feed, none are sent"
                );
                None
            }
            (_, false) => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                jwks,
                status_lists,
                revoked,
                dpop_seen: ReplayCache::new(DPOP_PROOFS_REMEMBERED),
                reports,
                decoded: DecodedCache::default(),
            }),
        })
    }

    /// Where requests are reported, when the configuration asks for it.
    pub fn reports(&self) -> Option<&RequestReports> {
        self.inner.reports.as_ref()
    }

    /// A verifier for a fixed JWKS document (`jwks`, as the broker serves
    /// it), offline: no fetching, no revocation feed (revoked tokens are
    /// accepted until they expire). For tools and tests; services should
    /// [`connect`](Self::connect) with a feed.
    pub fn offline(mut config: VerifierConfig, jwks: &[u8]) -> Result<Self, VerifyError> {
        config.leeway = config.leeway.min(MAX_LEEWAY);
        config.feed = None;
        config.status_lists = None;
        Ok(Self {
            inner: Arc::new(Inner {
                jwks: Arc::new(Jwks::fixed(jwks, MAYFLY_ALGORITHMS)?),
                status_lists: None,
                config,
                revoked: None,
                dpop_seen: ReplayCache::new(DPOP_PROOFS_REMEMBERED),
                reports: None,
                decoded: DecodedCache::default(),
            }),
        })
    }

    /// Waits until the revocation feed has replayed what it holds (or
    /// `timeout` passes); returns whether it has. True without a feed.
    pub async fn wait_for_feed(&self, timeout: std::time::Duration) -> bool {
        let Some(set) = &self.inner.revoked else {
            return true;
        };
        let deadline = tokio::time::Instant::now() + timeout;
        while set.silence().is_none() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        true
    }

    /// Verifies a bearer `token`; `peer_cert` is the DER client
    /// certificate the request came with, if any. A DPoP-bound token is
    /// refused here ([`verify_dpop`](Self::verify_dpop) takes it).
    /// Refetches the JWKS once on an unknown key.
    pub async fn verify(
        &self,
        token: &str,
        peer_cert: Option<&[u8]>,
    ) -> Result<VerifiedToken, VerifyError> {
        self.verify_presented(token, peer_cert, Presented::Bearer)
            .await
    }

    /// Verifies a DPoP-bound `token` sent as `Authorization: DPoP` with
    /// the proof in `request` (RFC 9449 §7): every bearer check, then the
    /// proof's signature, `typ`, `alg`, `htm`, `htu`, `iat` window, `ath`
    /// over this token, its key against `cnf.jkt`, and that its `jti` was
    /// not seen before.
    pub async fn verify_dpop(
        &self,
        token: &str,
        request: DpopRequest<'_>,
        peer_cert: Option<&[u8]>,
    ) -> Result<VerifiedToken, VerifyError> {
        self.verify_presented(token, peer_cert, Presented::Dpop(request))
            .await
    }

    async fn verify_presented(
        &self,
        token: &str,
        peer_cert: Option<&[u8]>,
        how: Presented<'_>,
    ) -> Result<VerifiedToken, VerifyError> {
        let checked = match self.check(token, peer_cert, how) {
            Err(VerifyError::UnknownKey(Some(_))) => {
                self.inner.jwks.refresh(false).await?;
                self.check(token, peer_cert, how)
            }
            other => other,
        };
        // A status list not held fresh: fetched now, then checked again.
        match (checked, &self.inner.status_lists) {
            (Err(VerifyError::StatusUnavailable(_)), Some(lists)) => {
                let n = self
                    .status_list_of(token)
                    .ok_or(VerifyError::StatusMissing)?;
                lists.fetch(n, &self.inner.jwks).await?;
                self.check(token, peer_cert, how)
            }
            (checked, _) => checked,
        }
    }

    /// The status list a token decoded lately names.
    fn status_list_of(&self, token: &str) -> Option<u64> {
        let decoded = self.inner.decoded.get(&DecodedCache::key(token))?;
        let lists = self.inner.status_lists.as_ref()?;
        lists
            .reference(decoded.claims.status.as_ref())
            .ok()
            .map(|(n, _)| n)
    }

    /// Verifies a bearer token with the keys and status lists already
    /// held (never waits; for synchronous callers such as tonic
    /// interceptors). An unknown key is refused; so is a token whose
    /// status list is not held yet, which is then fetched in the
    /// background for the next request.
    pub fn verify_cached(
        &self,
        token: &str,
        peer_cert: Option<&[u8]>,
    ) -> Result<VerifiedToken, VerifyError> {
        let checked = self.check(token, peer_cert, Presented::Bearer);
        if let (Err(VerifyError::StatusUnavailable(_)), Some(lists), Some(n), Ok(rt)) = (
            &checked,
            &self.inner.status_lists,
            self.status_list_of(token),
            tokio::runtime::Handle::try_current(),
        ) {
            let (lists, jwks) = (lists.clone(), self.inner.jwks.clone());
            rt.spawn(async move {
                if let Err(e) = lists.fetch(n, &jwks).await {
                    tracing::warn!(error = %e, "status list fetch failed");
                }
            });
        }
        checked
    }

    fn check(
        &self,
        token: &str,
        peer_cert: Option<&[u8]>,
        how: Presented<'_>,
    ) -> Result<VerifiedToken, VerifyError> {
        let key = DecodedCache::key(token);
        let decoded = match self.inner.decoded.get(&key) {
            Some(d) => {
                // Its key withdrawn from the JWKS since: not accepted.
                if self.inner.jwks.get(&d.kid).is_none() {
                    return Err(VerifyError::UnknownKey(Some(d.kid.clone())));
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |t| t.as_secs());
                if now
                    > d.claims
                        .exp
                        .saturating_add(self.inner.config.leeway.as_secs())
                {
                    return Err(VerifyError::Expired);
                }
                d
            }
            None => {
                let d = Arc::new(self.decode(token)?);
                self.inner.decoded.put(key, d.clone());
                d
            }
        };
        self.admit(&decoded.claims, token, peer_cert, how)
    }

    /// The checks of `token` itself, in RFC 8725's order: everything but
    /// its binding and its revocation.
    fn decode(&self, token: &str) -> Result<Decoded, VerifyError> {
        let cfg = &self.inner.config;
        let mut parts = token.split('.');
        let (Some(h), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(VerifyError::Malformed(
                "expected three dot-separated parts".into(),
            ));
        };
        let header: Header = URL_SAFE_NO_PAD
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| VerifyError::Malformed("header is not base64url JSON".into()))?;
        // Allow-list first: `none`, HS*, RS* never reach a key.
        let alg = match header.alg.as_deref() {
            Some("ES256") => Algorithm::ES256,
            Some("EdDSA") => Algorithm::EdDSA,
            other => return Err(VerifyError::Algorithm(other.unwrap_or("").to_owned())),
        };
        let typ_ok = header.typ.as_deref().is_some_and(|t| {
            t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("application/at+jwt")
        });
        if !typ_ok {
            return Err(VerifyError::WrongType(header.typ));
        }
        let kid = header.kid.ok_or(VerifyError::UnknownKey(None))?;
        let key = self
            .inner
            .jwks
            .get(&kid)
            .ok_or_else(|| VerifyError::UnknownKey(Some(kid.clone())))?;
        if key.alg != alg {
            return Err(VerifyError::KeyAlgorithmMismatch {
                kid,
                token: format!("{alg:?}"),
                key: format!("{:?}", key.alg),
            });
        }
        let mut v = Validation::new(alg);
        v.set_issuer(&[&cfg.issuer]);
        v.set_audience(&[&cfg.audience]);
        v.leeway = cfg.leeway.as_secs();
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub", "nbf"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &v)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => VerifyError::BadSignature,
                ErrorKind::ExpiredSignature => VerifyError::Expired,
                ErrorKind::ImmatureSignature => VerifyError::NotYetValid,
                ErrorKind::InvalidIssuer => VerifyError::WrongIssuer,
                ErrorKind::InvalidAudience => VerifyError::WrongAudience,
                ErrorKind::InvalidAlgorithm => VerifyError::Algorithm(format!("{alg:?}")),
                ErrorKind::MissingRequiredClaim(c) => VerifyError::MissingClaim(c.clone()),
                other => VerifyError::Malformed(format!("{other:?}")),
            })?
            .claims;
        // Exactly one audience, ours (RFC 9068 tokens from Mayfly carry one).
        if claims.aud.as_str() != Some(cfg.audience.as_str()) {
            return Err(VerifyError::WrongAudience);
        }
        Ok(Decoded { kid, claims })
    }

    /// The checks a decoded token passes on each request: its binding to
    /// the request, and that it is not revoked.
    fn admit(
        &self,
        claims: &Claims,
        token: &str,
        peer_cert: Option<&[u8]>,
        how: Presented<'_>,
    ) -> Result<VerifiedToken, VerifyError> {
        let cfg = &self.inner.config;
        // First, before anything with a side effect (a DPoP proof is
        // used once): a list not held fresh makes `verify` fetch it and
        // run these checks again.
        if let Some(lists) = &self.inner.status_lists {
            let (n, idx) = lists.reference(claims.status.as_ref())?;
            if lists.is_revoked(n, idx)? {
                return Err(VerifyError::Revoked);
            }
        }
        let claims = claims.clone();
        let (bound_to, dpop_key) = claims.cnf.map_or((None, None), |c| (c.x5t_s256, c.jkt));
        if let Some(want) = &bound_to {
            let cert = peer_cert.ok_or(VerifyError::CertificateRequired)?;
            if cert_thumbprint(cert) != *want {
                return Err(VerifyError::CertificateMismatch);
            }
        }
        match (how, &dpop_key) {
            (Presented::Bearer, None) => {}
            (Presented::Bearer, Some(_)) => return Err(VerifyError::DpopRequired),
            (Presented::Dpop(_), None) => return Err(VerifyError::NotDpopBound),
            (Presented::Dpop(r), Some(jkt)) => self.check_proof(token, r, jkt)?,
        }
        if set_revoked(self.feed_state(), &[&claims.jti])? {
            return Err(VerifyError::Revoked);
        }
        let bad = |c: &str| VerifyError::Malformed(format!("claim {c} is not valid"));
        Ok(VerifiedToken {
            agent: SpiffeId::new(&claims.sub).map_err(|_| bad("sub"))?,
            task_id: TaskId::new(&claims.task_id).map_err(|_| bad("task_id"))?,
            lease_id: LeaseId::new(&claims.jti).map_err(|_| bad("jti"))?,
            scopes: claims
                .scope
                .map(|s| {
                    s.split(' ')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            audience: cfg.audience.clone(),
            expires_at: claims.exp,
            actor: claims.act,
            bound_to,
            dpop_key,
        })
    }

    /// The lease (`jti`) of a `token` that was refused, if it is one of
    /// the issuer's for this audience whose signature verifies (refused
    /// for its time, revocation or binding): what a service may report
    /// the refusal under. `None` for anything else, whose `jti` could be
    /// anyone's.
    pub fn refused_lease(&self, token: &str) -> Option<LeaseId> {
        let cfg = &self.inner.config;
        let header: Header = token
            .split('.')
            .next()
            .and_then(|h| URL_SAFE_NO_PAD.decode(h).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())?;
        let alg = match header.alg.as_deref() {
            Some("ES256") => Algorithm::ES256,
            Some("EdDSA") => Algorithm::EdDSA,
            _ => return None,
        };
        let key = self.inner.jwks.get(header.kid.as_deref()?)?;
        if key.alg != alg {
            return None;
        }
        let mut v = Validation::new(alg);
        v.set_issuer(&[&cfg.issuer]);
        v.set_audience(&[&cfg.audience]);
        v.validate_exp = false;
        v.validate_nbf = false;
        v.set_required_spec_claims(&["iss", "aud"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &v)
            .ok()?
            .claims;
        if claims.aud.as_str() != Some(cfg.audience.as_str()) {
            return None;
        }
        LeaseId::new(&claims.jti).ok()
    }

    /// The proof `r` for `token`, bound to `jkt`, used once.
    fn check_proof(&self, token: &str, r: DpopRequest<'_>, jkt: &str) -> Result<(), VerifyError> {
        let now = mayfly_core::Timestamp::now();
        let proof = verify_proof(
            r.proof,
            &ProofRequest {
                method: r.method,
                url: r.url,
                access_token: Some(token),
                now,
            },
        )?;
        if proof.jkt != jkt {
            return Err(DpopError::WrongKey.into());
        }
        self.inner.dpop_seen.check(&proof, now)?;
        Ok(())
    }

    /// Where the revocation feed stands: `None` when verifying offline
    /// (no feed configured), else the set and whether it may be trusted
    /// now (`Err` when it is silent and the config fails closed).
    fn feed_state(&self) -> Option<Result<&RevocationSet, VerifyError>> {
        let (set, feed) = match (&self.inner.revoked, &self.inner.config.feed) {
            (Some(set), Some(feed)) => (set, feed),
            _ => return None,
        };
        if !feed.fail_open {
            match set.silence() {
                None => return Some(Err(VerifyError::FeedNotSynced)),
                Some(s) if s > feed.max_silence => return Some(Err(VerifyError::FeedStale(s))),
                Some(_) => {}
            }
        }
        Some(Ok(set))
    }

    /// The agent and task of a task certificate a client presented (DER,
    /// already validated against the trust bundle by your TLS stack),
    /// refused when the broker has revoked it or its task. With a feed,
    /// this fails closed like [`verify`](Self::verify) when the feed is
    /// silent; without one, revocation is not checked.
    pub fn task_identity(&self, der: &[u8]) -> Result<TaskIdentity, PeerCertError> {
        let id = parse_task_certificate(der)?;
        let state = self.feed_state().map(|s| {
            s.map_err(|e| match e {
                VerifyError::FeedStale(d) => PeerCertError::FeedStale(d),
                _ => PeerCertError::FeedNotSynced,
            })
        });
        if let Some(set) = state.transpose()?
            && (set.is_serial_revoked(&id.serial) || set.is_revoked(id.task_id.as_str()))
        {
            return Err(PeerCertError::Revoked {
                serial: id.serial.clone(),
            });
        }
        Ok(id)
    }

    /// Starts a JWKS refetch (rate limited) without waiting for it.
    pub fn refresh_keys_in_background(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.inner.jwks.refresh(false).await {
                tracing::warn!(error = %e, "JWKS refresh failed");
            }
        });
    }

    /// Whether the feed has reported this certificate serial (hex) revoked.
    pub fn is_certificate_revoked(&self, serial: &str) -> bool {
        self.inner
            .revoked
            .as_ref()
            .is_some_and(|s| s.is_serial_revoked(serial))
    }

    /// The last feed cursor received (0 without a feed).
    pub fn feed_cursor(&self) -> u64 {
        self.inner.revoked.as_ref().map_or(0, |s| s.cursor())
    }

    /// How many revocations are held (0 without a feed).
    pub fn revocations_held(&self) -> usize {
        self.inner.revoked.as_ref().map_or(0, |s| s.len())
    }
}
