//! The sections of `mayfly.toml`, each with its defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mayfly_core::{SpiffeId, SpiffeIdPattern, TrustDomain};
use serde::{Deserialize, Deserializer};

use super::values::{bytes, duration, optional_duration};

/// `[connections]`: bounds on the connections of each port (gRPC and
/// HTTPS alike, counted per port). A connection is *unauthenticated* from
/// accept until its TLS handshake presents a valid client SVID, and stays so
/// without one (JWKS and CRL fetchers, probes, and anyone else).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Connections {
    /// The TLS handshake must complete within this.
    #[serde(deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// An authenticated connection with no request in flight for this long
    /// is closed (gracefully: HTTP/2 GOAWAY); the client reconnects when it
    /// needs to.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// The same for an unauthenticated connection.
    #[serde(deserialize_with = "duration")]
    pub unauthenticated_idle_timeout: Duration,
    /// Open connections per port; more are closed at accept.
    pub max: usize,
    /// Unauthenticated connections per port: the rest of `max` is kept for
    /// authenticated agents and operators. When it is full, a newcomer is
    /// not refused: the source holding the most of these gives one up (its
    /// longest-idle connection first).
    pub max_unauthenticated: usize,
    /// Unauthenticated connections from one source per port; more from it
    /// are closed at accept (behind a load balancer without the PROXY
    /// protocol, every client shares its address: raise this).
    pub max_unauthenticated_per_source: usize,
    /// IPv6 addresses count as one source per prefix of this many bits
    /// (one customer is usually given a whole /64); IPv4 addresses, and
    /// IPv4-mapped IPv6 ones, count per address.
    pub ipv6_source_prefix: u8,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            unauthenticated_idle_timeout: Duration::from_secs(10),
            max: 4096,
            max_unauthenticated: 1024,
            max_unauthenticated_per_source: 64,
            ipv6_source_prefix: 64,
        }
    }
}

/// Where audit records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditSinkKind {
    /// A JSON-lines file (`path`).
    File,
    /// A stream in the Redis store (with `store = "redis"`): one chain for
    /// every replica.
    Redis,
    /// Standard output, for log pipelines.
    Stdout,
    /// No trail.
    Off,
}

/// `[audit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// Where records go; unset: a file with the embedded store, the
    /// store's stream with Redis (so replicas keep one chain).
    #[serde(default)]
    pub sink: Option<AuditSinkKind>,
    /// The file, for `sink = "file"`; default `data_dir/audit.jsonl`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// File trail: rotate once the active file holds this much ("64MiB").
    #[serde(default = "default_rotate_size", deserialize_with = "bytes")]
    pub rotate_size: u64,
    /// File trail: rotate once the active file's first record is this old.
    #[serde(default = "default_rotate_age", deserialize_with = "duration")]
    pub rotate_age: Duration,
    /// Delete records older than this: rotated file segments last written
    /// longer ago, and Redis stream entries; unset keeps everything (export
    /// the trail before it ages out).
    #[serde(default, deserialize_with = "optional_duration")]
    pub retention: Option<Duration>,
}

impl Default for Audit {
    fn default() -> Self {
        Self {
            sink: None,
            path: None,
            rotate_size: default_rotate_size(),
            rotate_age: default_rotate_age(),
            retention: None,
        }
    }
}

fn default_rotate_size() -> u64 {
    64 * 1024 * 1024
}

fn default_rotate_age() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// One `[[introspection]]`: these workloads may introspect tokens issued
/// for these audiences (RFC 7662, over mTLS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    /// SPIFFE ID patterns of the resource servers.
    pub clients: Vec<SpiffeIdPattern>,
    /// Audience patterns whose tokens they may inspect.
    pub audiences: Vec<String>,
}

/// One `[[resource_servers]]`: these workloads are the services that
/// receive tokens issued for these audiences. Only a token's recipient may
/// exchange it (RFC 8693) or introspect it (RFC 7662): a token that leaked
/// to anyone else cannot be laundered into a new lease.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceServerConfig {
    /// What policy and the trail call this resource server
    /// (`context.resource_server` of `exchange_token`).
    pub name: String,
    /// SPIFFE ID patterns of its workloads.
    pub clients: Vec<SpiffeIdPattern>,
    /// Audience patterns of the tokens it receives.
    pub audiences: Vec<String>,
}

/// One `[[gateways]]`: a gateway that may ask the broker about tool calls
/// (the `Gateway` API), and the upstreams it fronts, each with the
/// audience of the tokens agents call it with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The gateway's SPIFFE ID (its client certificate), exactly.
    pub id: SpiffeId,
    /// Upstream name (`Mayfly::Tool::"<upstream>/<tool>"`) to the audience
    /// of its tokens.
    pub upstreams: std::collections::BTreeMap<String, String>,
}

/// Which lease store to use.
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreKind {
    /// A redb file in `data_dir`.
    #[default]
    Embedded,
    /// A Redis shared by every broker replica (`[redis]` has the details).
    Redis,
    /// `store = "redis://…"`: shorthand for `store = "redis"` with that
    /// URL; resolved while parsing, never seen after.
    RedisUrl(String),
}

impl std::fmt::Debug for StoreKind {
    /// A store URL without its credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedded => f.write_str("Embedded"),
            Self::Redis => f.write_str("Redis"),
            Self::RedisUrl(url) => f
                .debug_tuple("RedisUrl")
                .field(&crate::store::RedisTarget::redacted(url))
                .finish(),
        }
    }
}

impl<'de> Deserialize<'de> for StoreKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "embedded" => Ok(Self::Embedded),
            "redis" => Ok(Self::Redis),
            url if url.starts_with("redis://") || url.starts_with("rediss://") => {
                Ok(Self::RedisUrl(url.to_owned()))
            }
            other => Err(serde::de::Error::custom(format!(
                "unknown store {:?}: expected \"embedded\", \"redis\" or a redis:// URL",
                crate::store::RedisTarget::redacted(other)
            ))),
        }
    }
}

/// `[redis]`: where the shared store is. Give `url` (or `url_file`), or
/// `sentinels` and `master_name`.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` or `rediss://…` (TLS). Prefer `url_file` when
    /// the URL carries a password.
    #[serde(default)]
    pub url: Option<String>,
    /// A file holding the URL (e.g. a mounted secret).
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// Sentinel addresses, `redis://host:26379`, for automatic failover.
    #[serde(default)]
    pub sentinels: Vec<String>,
    /// The primary's name as the Sentinels know it.
    #[serde(default)]
    pub master_name: Option<String>,
    /// A file holding the data nodes' password (Sentinel mode).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM CA for `rediss://` with a private CA.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Prefix of every key (one Redis may hold several deployments).
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// Replicas that must acknowledge each write before a credential is
    /// handed out (Redis `WAIT`); 0 trusts the primary alone.
    #[serde(default)]
    pub replicas_to_ack: u32,
}

impl std::fmt::Debug for RedisConfig {
    /// The URL without its credentials: a config is logged and printed in
    /// errors, its password never.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field(
                "url",
                &self.url.as_deref().map(crate::store::RedisTarget::redacted),
            )
            .field("url_file", &self.url_file)
            .field(
                "sentinels",
                &self
                    .sentinels
                    .iter()
                    .map(|u| crate::store::RedisTarget::redacted(u))
                    .collect::<Vec<_>>(),
            )
            .field("master_name", &self.master_name)
            .field("password_file", &self.password_file)
            .field("ca", &self.ca)
            .field("key_prefix", &self.key_prefix)
            .field("replicas_to_ack", &self.replicas_to_ack)
            .finish()
    }
}

pub(super) fn default_prefix() -> String {
    "mayfly".to_owned()
}

/// Listening addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// mTLS gRPC (Broker and Admin services).
    pub grpc: SocketAddr,
    /// HTTPS: JWKS, metadata, health.
    pub http: SocketAddr,
    /// Plain-text gRPC with only `grpc.health.v1.Health`, for probes that
    /// cannot present a client certificate; none if unset.
    #[serde(default)]
    pub health: Option<SocketAddr>,
}

/// TLS material: three files, or the SPIFFE Workload API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// The broker's server certificate chain (PEM).
    #[serde(default)]
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8; must be mode 0600).
    #[serde(default)]
    pub key: PathBuf,
    /// CA certificates that client SVIDs must chain to (PEM).
    #[serde(default)]
    pub trust_bundle: PathBuf,
    /// Instead of the three files: the SPIFFE Workload API (e.g.
    /// `unix:///run/spire/agent.sock`) gives the broker's X.509-SVID (its
    /// server certificate, which must name the broker's host as a DNS SAN)
    /// and the bundle of its trust domain, and their rotations.
    #[serde(default)]
    pub workload_api: Option<String>,
    /// Other trust domains whose SVIDs are accepted, each only if it
    /// chains to that trust domain's own bundle (`[[tls.federated]]`).
    #[serde(default)]
    pub federated: Vec<FederatedBundle>,
    /// How often to look for changed files (SIGHUP reloads at once); a
    /// change is swapped in for new handshakes, live connections keep
    /// theirs, and invalid material is refused with the old kept.
    #[serde(default = "default_reload", deserialize_with = "duration")]
    pub reload_interval: Duration,
}

/// `[[tls.federated]]`: the bundle of another trust domain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedBundle {
    /// The trust domain, e.g. `partner.example`.
    pub trust_domain: TrustDomain,
    /// Its CA certificates (PEM); they vouch for its SVIDs only. Unset
    /// with `workload_api`: the Workload API's federated bundle for the
    /// trust domain, followed as it changes.
    #[serde(default)]
    pub bundle: PathBuf,
}

/// `[[federation]]`: an issuer of workload identity tokens (Kubernetes
/// service-account tokens, cloud and CI OIDC tokens, SPIFFE JWT-SVIDs)
/// whose tokens authenticate callers without a client certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// The `iss` its tokens carry, exactly; unset only for JWT-SVIDs
    /// without `iss` (`spiffe_bundle`).
    #[serde(default)]
    pub issuer: Option<String>,
    /// Its JWKS, fetched over HTTPS trusting only `ca`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// CA certificates (PEM) the JWKS server must chain to.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Its JWKS, from a file.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// A SPIFFE trust bundle (a JWKS whose keys sign JWT-SVIDs) of the
    /// broker's trust domain.
    #[serde(default)]
    pub spiffe_bundle: Option<PathBuf>,
    /// JWT-SVIDs checked against the JWT bundle of the broker's trust
    /// domain from the SPIFFE Workload API (`[tls] workload_api`), as it
    /// pushes each update.
    #[serde(default)]
    pub workload_api: bool,
    /// The audience its tokens must name; default: the broker's issuer.
    #[serde(default)]
    pub audience: Option<String>,
    /// Algorithms accepted (asymmetric only).
    #[serde(default = "default_federation_algorithms")]
    pub algorithms: Vec<String>,
    /// The oldest token accepted (now − `iat`); tokens without `iat` or
    /// `exp` are refused.
    #[serde(default = "default_max_age", deserialize_with = "duration")]
    pub max_age: Duration,
    /// A pattern over `sub` naming parts as `{name}`, e.g.
    /// `system:serviceaccount:{ns}:{sa}`; default: `{sub}`, the whole.
    #[serde(default)]
    pub subject: Option<String>,
    /// The caller's SPIFFE ID, from the parts of `subject`, e.g.
    /// `spiffe://example.org/ns/{ns}/sa/{sa}`; default: `{sub}` (for
    /// JWT-SVIDs, whose `sub` is the SPIFFE ID). Only IDs of the broker's
    /// trust domain are accepted.
    #[serde(default)]
    pub spiffe_id: Option<String>,
    /// Claims the token must carry with exactly these (string) values,
    /// e.g. `repository_owner = "octo-org"`.
    #[serde(default)]
    pub claims: std::collections::BTreeMap<String, String>,
    /// The least time between two JWKS fetches for unknown `kid`s.
    #[serde(default = "default_jwks_refresh", deserialize_with = "duration")]
    pub jwks_refresh: Duration,
    /// How often a `jwks_url` is fetched again regardless, so a key the
    /// issuer withdrew stops verifying.
    #[serde(default = "default_jwks_max_age", deserialize_with = "duration")]
    pub jwks_max_age: Duration,
    /// A token with a `jti` is accepted once per cluster (default). `false`
    /// accepts it on any number of connections until it expires, for
    /// issuers that hand a workload the same token for most of its life
    /// (Kubernetes projected tokens); `max_age` then bounds a stolen
    /// token's use.
    #[serde(default = "yes")]
    pub single_use: bool,
}

fn yes() -> bool {
    true
}

fn default_federation_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}

fn default_max_age() -> Duration {
    Duration::from_secs(3600)
}

fn default_jwks_max_age() -> Duration {
    Duration::from_secs(300)
}

fn default_jwks_refresh() -> Duration {
    Duration::from_secs(30)
}

use crate::issuer::Algorithm;

/// Token lifetimes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tokens {
    /// Signing algorithm.
    pub algorithm: Algorithm,
    /// Used when a request asks for 0.
    #[serde(deserialize_with = "duration")]
    pub default_ttl: Duration,
    /// No token lives longer.
    #[serde(deserialize_with = "duration")]
    pub max_ttl: Duration,
    /// How often to look at the key files for a rotation.
    #[serde(deserialize_with = "duration")]
    pub key_reload_interval: Duration,
    /// Validators' clock leeway: a superseded key stays in the JWKS this
    /// long after the last token it signed expired.
    #[serde(deserialize_with = "duration")]
    pub retire_grace: Duration,
    /// Rotate the signing key this often, without an operator: the next
    /// key is written `rotate_lead` before it signs, and keys no longer
    /// published are deleted. Unset: only `mayfly keys rotate` rotates.
    #[serde(deserialize_with = "optional_duration")]
    pub rotate_every: Option<Duration>,
    /// How long a scheduled key is published before it signs: longer than
    /// validators keep the JWKS.
    #[serde(deserialize_with = "duration")]
    pub rotate_lead: Duration,
    /// The Token Status Lists' `ttl`: how long a validator may keep one,
    /// so the longest a revocation takes to reach a validator reading
    /// them.
    #[serde(deserialize_with = "duration")]
    pub status_list_ttl: Duration,
}

impl Default for Tokens {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::ES256,
            default_ttl: Duration::from_secs(300),
            max_ttl: Duration::from_secs(900),
            key_reload_interval: Duration::from_secs(10),
            retire_grace: Duration::from_secs(60),
            rotate_every: None,
            rotate_lead: Duration::from_secs(600),
            status_list_ttl: Duration::from_secs(5),
        }
    }
}

/// `[ssf]`: the Shared Signals transmitter.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ssf {
    /// The `https://` URL prefixes (each ending in `/`) receivers' push
    /// endpoints must start with: the broker POSTs to them, so the
    /// operator names where. None: no push over https.
    pub push_endpoints: Vec<String>,
    /// Let receivers' push endpoints be `http://` on a loopback address
    /// (the broker's own host: for development).
    pub allow_loopback_http: bool,
}

/// `[certificates]`: lifetimes of task certificates and of the CRL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Certificates {
    /// Used when a request asks for 0.
    #[serde(deserialize_with = "duration")]
    pub default_ttl: Duration,
    /// No certificate lives longer.
    #[serde(deserialize_with = "duration")]
    pub max_ttl: Duration,
    /// The CRL's nextUpdate is this far after its thisUpdate.
    #[serde(deserialize_with = "duration")]
    pub crl_validity: Duration,
}

impl Default for Certificates {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(600),
            max_ttl: Duration::from_secs(3600),
            crl_validity: Duration::from_secs(600),
        }
    }
}

/// Task lifetimes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tasks {
    /// Used when a request asks for 0.
    #[serde(deserialize_with = "duration")]
    pub default_ttl: Duration,
    /// No task lives longer.
    #[serde(deserialize_with = "duration")]
    pub max_ttl: Duration,
    /// How many delegations may separate a task from its root.
    pub max_delegation_depth: usize,
}

impl Default for Tasks {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(15 * 60),
            max_ttl: Duration::from_secs(8 * 3600),
            max_delegation_depth: 4,
        }
    }
}

/// `[feed]`: the revocation feed validators follow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Feed {
    /// Who may watch; default: every workload of the trust domain.
    pub watchers: Option<Vec<SpiffeIdPattern>>,
    /// How often a quiet feed sends a heartbeat.
    #[serde(deserialize_with = "duration")]
    pub heartbeat: Duration,
    /// How often to look for revocations made through other replicas.
    #[serde(deserialize_with = "duration")]
    pub poll: Duration,
}

impl Default for Feed {
    fn default() -> Self {
        Self {
            watchers: None,
            heartbeat: Duration::from_secs(5),
            poll: Duration::from_millis(25),
        }
    }
}

/// Expiry and clean-up.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reaper {
    /// How often expired leases are moved to `expired`.
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    /// How long records are kept after they expire.
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
}

impl Default for Reaper {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// `[approvals]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Approvals {
    /// How long an approval may wait for a decision, and then for use.
    #[serde(deserialize_with = "duration")]
    pub ttl: Duration,
}

impl Default for Approvals {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(600),
        }
    }
}

/// `[rate_limit]`: a token bucket per agent on IssueToken and
/// SignCertificate (per broker replica).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimit {
    /// Credentials per second per agent; 0 turns the limit off.
    pub per_second: f64,
    /// How many may come at once.
    pub burst: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_second: 50.0,
            burst: 100.0,
        }
    }
}

/// `[policy]`: the Cedar policies that decide every request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of `*.cedar` files, validated against Mayfly's schema.
    pub dir: PathBuf,
    /// How often to look for changed files (SIGHUP reloads at once).
    #[serde(default = "default_reload", deserialize_with = "duration")]
    pub reload_interval: Duration,
}

fn default_reload() -> Duration {
    Duration::from_secs(2)
}
