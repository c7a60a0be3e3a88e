//! What a validator needs to know.

use std::time::Duration;

/// The most clock leeway allowed on `exp` and `nbf`.
pub const MAX_LEEWAY: Duration = Duration::from_secs(30);

/// The validator's own X.509-SVID, to follow the revocation feed over mTLS.
#[derive(Clone)]
pub struct FeedConfig {
    /// The broker's gRPC URL, `https://host:port`.
    pub broker: String,
    /// PEM of the validator's SVID (leaf first).
    pub cert_pem: Vec<u8>,
    /// PEM of its key.
    pub key_pem: Vec<u8>,
    /// The feed counts as dead after this long without a message (events or
    /// heartbeats); verification then fails closed unless `fail_open`.
    pub max_silence: Duration,
    /// Accept tokens while the feed is silent (not recommended).
    pub fail_open: bool,
}

impl std::fmt::Debug for FeedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedConfig")
            .field("broker", &self.broker)
            .field("max_silence", &self.max_silence)
            .field("fail_open", &self.fail_open)
            .finish_non_exhaustive()
    }
}

/// How to verify tokens for one audience.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// The exact `iss` (the broker's issuer URL).
    pub issuer: String,
    /// This service's audience: tokens for others are refused.
    pub audience: String,
    /// Where the JWKS is (usually `<issuer>/.well-known/jwks.json`).
    pub jwks_url: String,
    /// PEM CA(s) for the JWKS URL's and the broker's server certificates.
    pub ca_pem: Vec<u8>,
    /// Clock leeway on `exp`/`nbf` (at most [`MAX_LEEWAY`]).
    pub leeway: Duration,
    /// At most one JWKS refetch per this interval on an unknown `kid`.
    pub jwks_refresh_interval: Duration,
    /// The revocation feed; `None` verifies offline (revocations are then
    /// not seen before expiry).
    pub feed: Option<FeedConfig>,
    /// Revocations from the broker's Token Status Lists (besides the feed
    /// when both are set); `None` reads no lists.
    pub status_lists: Option<crate::StatusListConfig>,
    /// Take the CA bundle (for the broker's certificate) and the feed's
    /// identity from this SPIFFE Workload API instead of `ca_pem` and the
    /// feed's `cert_pem`/`key_pem`, following its rotations.
    pub workload_api: Option<String>,
    /// Report the requests tokens come with to the broker, as the feed's
    /// identity ([`crate::RequestReports`]; the layer does it). Needs the
    /// feed, and this service listed in a `[[resource_servers]]` entry
    /// for its audience.
    pub report_requests: bool,
}

impl VerifierConfig {
    /// A configuration with defaults: JWKS at `<issuer>/.well-known/jwks.json`,
    /// 30 s leeway, refetch at most every 30 s, no feed.
    pub fn new(issuer: &str, audience: &str, ca_pem: Vec<u8>) -> Self {
        let issuer = issuer.trim_end_matches('/').to_owned();
        Self {
            jwks_url: format!("{issuer}/.well-known/jwks.json"),
            issuer,
            audience: audience.to_owned(),
            ca_pem,
            leeway: MAX_LEEWAY,
            jwks_refresh_interval: Duration::from_secs(30),
            feed: None,
            status_lists: None,
            workload_api: None,
            report_requests: false,
        }
    }

    /// A verifier whose trust comes from the SPIFFE Workload API at
    /// `endpoint` (e.g. `unix:///run/spire/agent.sock`): the bundle of the
    /// service's own trust domain checks the broker's certificate, and
    /// [`Self::with_workload_feed`] follows the feed as the service's SVID.
    pub fn from_workload_api(issuer: &str, audience: &str, endpoint: &str) -> Self {
        let mut c = Self::new(issuer, audience, Vec::new());
        c.workload_api = Some(endpoint.to_owned());
        c
    }

    /// Follows the broker's revocation feed as the Workload API's SVID.
    pub fn with_workload_feed(self, broker: &str) -> Self {
        self.with_feed(broker, Vec::new(), Vec::new())
    }

    /// Reports the requests tokens come with to the broker (see
    /// [`Self::report_requests`]).
    pub fn with_request_reports(mut self) -> Self {
        self.report_requests = true;
        self
    }

    /// Reads revocations from the broker's Token Status Lists: for a
    /// service without an SVID to follow the feed with. A revocation then
    /// reaches it within the lists' `ttl` (at most a minute).
    pub fn with_status_lists(mut self) -> Self {
        self.status_lists = Some(crate::StatusListConfig::default());
        self
    }

    /// Follows the broker's revocation feed with this identity, failing
    /// closed after 15 s of silence.
    pub fn with_feed(mut self, broker: &str, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Self {
        self.feed = Some(FeedConfig {
            broker: broker.to_owned(),
            cert_pem,
            key_pem,
            max_silence: Duration::from_secs(15),
            fail_open: false,
        });
        self
    }
}
