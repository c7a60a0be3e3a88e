//! `mayfly.toml`: everything the broker needs to start. Relative paths are
//! resolved against the file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mayfly_core::{Pattern, SpiffeIdPattern, TrustDomain};

use crate::service::IntrospectionGrant;
use serde::{Deserialize, Deserializer};

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has wrong or unknown keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
    /// Values that parse but do not fit together.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The parsed configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The trust domain agents and operators must belong to.
    pub trust_domain: TrustDomain,
    /// `iss` of every token; defaults to `https://<listen.http>`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Where keys and the embedded store live (created 0700).
    pub data_dir: PathBuf,
    /// Lease store: `embedded` (default) or `redis`.
    #[serde(default)]
    pub store: StoreKind,
    /// The Redis store, when `store = "redis"`.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// Listening addresses.
    pub listen: Listen,
    /// Server certificate and trust bundle.
    pub tls: Tls,
    /// SPIFFE IDs allowed to call the Admin API.
    #[serde(default)]
    pub operators: Vec<SpiffeIdPattern>,
    /// Token lifetimes and signing algorithm.
    #[serde(default)]
    pub tokens: Tokens,
    /// Task lifetimes.
    #[serde(default)]
    pub tasks: Tasks,
    /// The issuing CA for task certificates; without it SignCertificate is
    /// refused and `/crl` is absent.
    #[serde(default)]
    pub ca: Option<CaFiles>,
    /// Certificate lifetimes and the CRL.
    #[serde(default)]
    pub certificates: Certificates,
    /// Expiry and clean-up.
    #[serde(default)]
    pub reaper: Reaper,
    /// The revocation feed.
    #[serde(default)]
    pub feed: Feed,
    /// The policies.
    pub policy: PolicyConfig,
    /// Approvals.
    #[serde(default)]
    pub approvals: Approvals,
    /// Per-agent issuance limits.
    #[serde(default)]
    pub rate_limit: RateLimit,
    /// Who may introspect tokens for which audiences.
    #[serde(default)]
    pub introspection: Vec<IntrospectionConfig>,
    /// The audit trail.
    #[serde(default)]
    pub audit: Audit,
    /// How long and how many connections each port holds.
    #[serde(default)]
    pub connections: Connections,
}

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
    /// authenticated agents and operators.
    pub max_unauthenticated: usize,
    /// Unauthenticated connections from one source address per port
    /// (behind a load balancer without the PROXY protocol, every client
    /// shares its address: raise this).
    pub max_unauthenticated_per_source: usize,
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

/// `"64MiB"`, `"512KiB"`, `"1GiB"`, or plain bytes.
fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s = String::deserialize(d)?;
    let t = s.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => 0,
    };
    digits
        .parse::<u64>()
        .ok()
        .filter(|_| scale > 0)
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "size {s:?}: a number of bytes, or with KiB, MiB or GiB (e.g. \"64MiB\")"
            ))
        })
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
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

/// Which lease store to use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

fn default_prefix() -> String {
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

/// TLS material.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// The broker's server certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8; must be mode 0600).
    pub key: PathBuf,
    /// CA certificates that client SVIDs must chain to (PEM).
    pub trust_bundle: PathBuf,
}

/// JWT signing algorithm (`tokens.algorithm`).
pub use crate::issuer::Algorithm;

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
}

impl Default for Tokens {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::ES256,
            default_ttl: Duration::from_secs(300),
            max_ttl: Duration::from_secs(900),
        }
    }
}

/// `[ca]`: the issuing CA's certificate (optionally followed by
/// intermediates up to the root) and key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaFiles {
    /// PEM certificate chain, issuing CA first.
    pub cert: PathBuf,
    /// PEM PKCS#8 key (mode 0600).
    pub key: PathBuf,
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

impl Config {
    /// Who may watch the feed.
    pub fn feed_watchers(&self) -> Vec<SpiffeIdPattern> {
        match &self.feed.watchers {
            Some(w) => w.clone(),
            None => SpiffeIdPattern::new(&format!("spiffe://{}/*", self.trust_domain))
                .map(|p| vec![p])
                .unwrap_or_default(),
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

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "duration {s:?}: {e} (e.g. \"90s\", \"5m\", \"8h\")"
        ))
    })
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses configuration text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        if let StoreKind::RedisUrl(url) = &config.store {
            let redis = config.redis.get_or_insert_with(RedisConfig::default);
            if redis.url.is_some() || redis.url_file.is_some() || !redis.sentinels.is_empty() {
                return Err(ConfigError::Invalid(
                    "store is a URL and [redis] names another server; give one".into(),
                ));
            }
            redis.url = Some(url.clone());
            if redis.key_prefix.is_empty() {
                redis.key_prefix = default_prefix();
            }
            config.store = StoreKind::Redis;
        }
        let mut paths = vec![
            &mut config.data_dir,
            &mut config.tls.cert,
            &mut config.tls.key,
            &mut config.tls.trust_bundle,
        ];
        paths.push(&mut config.policy.dir);
        if let Some(p) = config.audit.path.as_mut() {
            paths.push(p);
        }
        if let Some(ca) = config.ca.as_mut() {
            paths.extend([&mut ca.cert, &mut ca.key]);
        }
        if let Some(r) = config.redis.as_mut() {
            paths.extend(
                [&mut r.url_file, &mut r.password_file, &mut r.ca]
                    .into_iter()
                    .flatten(),
            );
        }
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let whole = [
            ("tokens.default_ttl", Some(self.tokens.default_ttl)),
            ("tokens.max_ttl", Some(self.tokens.max_ttl)),
            ("tasks.default_ttl", Some(self.tasks.default_ttl)),
            ("tasks.max_ttl", Some(self.tasks.max_ttl)),
            (
                "certificates.default_ttl",
                Some(self.certificates.default_ttl),
            ),
            ("certificates.max_ttl", Some(self.certificates.max_ttl)),
            (
                "certificates.crl_validity",
                Some(self.certificates.crl_validity),
            ),
        ]
        .into_iter();
        for (name, d) in whole {
            if let Some(d) = d
                && (d.subsec_nanos() != 0 || d.is_zero())
            {
                return invalid(format!(
                    "{name} must be a whole number of seconds, at least 1s"
                ));
            }
        }
        if self.tokens.max_ttl.is_zero() || self.tokens.default_ttl > self.tokens.max_ttl {
            return invalid("tokens: need 0 < default_ttl <= max_ttl".into());
        }
        if self.tasks.max_ttl.is_zero() || self.tasks.default_ttl > self.tasks.max_ttl {
            return invalid("tasks: need 0 < default_ttl <= max_ttl".into());
        }
        if self.certificates.default_ttl > self.certificates.max_ttl {
            return invalid("certificates: need default_ttl <= max_ttl".into());
        }
        self.check_store()?;
        if self.audit_sink() == AuditSinkKind::Redis && self.store != StoreKind::Redis {
            return invalid("[audit] sink = \"redis\" needs store = \"redis\"".into());
        }
        if self.audit.path.is_some() && self.audit_sink() != AuditSinkKind::File {
            return invalid("[audit] path is only for sink = \"file\"".into());
        }
        if self.audit.rotate_size < 4096 || self.audit.rotate_age < Duration::from_secs(60) {
            return invalid(
                "[audit] rotate_size must be at least 4KiB and rotate_age at least 1m".into(),
            );
        }
        if self
            .audit
            .retention
            .is_some_and(|r| r < Duration::from_secs(3600))
        {
            return invalid("[audit] retention must be at least 1h".into());
        }
        if self.feed.heartbeat.is_zero() || self.feed.poll.is_zero() {
            return invalid("feed.heartbeat and feed.poll must be positive".into());
        }
        if self.reaper.interval.is_zero() {
            return invalid("reaper.interval must be positive".into());
        }
        if let Some(iss) = &self.issuer
            && !iss.starts_with("https://")
        {
            return invalid(format!("issuer {iss:?} must be an https:// URL"));
        }
        if self.policy.reload_interval.is_zero() {
            return invalid("policy.reload_interval must be positive".into());
        }
        let c = &self.connections;
        if c.handshake_timeout.is_zero()
            || c.idle_timeout.is_zero()
            || c.unauthenticated_idle_timeout.is_zero()
        {
            return invalid("connections: timeouts must be positive".into());
        }
        if !(0 < c.max_unauthenticated_per_source
            && c.max_unauthenticated_per_source <= c.max_unauthenticated
            && c.max_unauthenticated < c.max)
        {
            return invalid(
                "connections: need 0 < max_unauthenticated_per_source <= max_unauthenticated < max \
                 (the rest of max is kept for authenticated callers)"
                    .into(),
            );
        }
        self.introspection_grants()?;
        Ok(())
    }

    fn check_store(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        match (&self.store, &self.redis) {
            (StoreKind::Redis, None) => invalid("store = \"redis\" needs a [redis] section"),
            (StoreKind::Embedded, Some(_)) => invalid("a [redis] section needs store = \"redis\""),
            (StoreKind::Embedded, None) => Ok(()),
            (StoreKind::RedisUrl(_), _) => invalid("store URL not resolved"),
            (StoreKind::Redis, Some(r)) => {
                let given = [
                    r.url.is_some(),
                    r.url_file.is_some(),
                    !r.sentinels.is_empty(),
                ];
                if given.iter().filter(|g| **g).count() != 1 {
                    return invalid("[redis] needs exactly one of url, url_file or sentinels");
                }
                if !r.sentinels.is_empty() && r.master_name.is_none() {
                    return invalid("[redis] sentinels need master_name");
                }
                if let Some(u) = &r.url
                    && !(u.starts_with("redis://") || u.starts_with("rediss://"))
                {
                    return invalid("[redis] url must start with redis:// or rediss://");
                }
                Ok(())
            }
        }
    }

    /// The issuer URL (`iss`), without a trailing slash.
    pub fn issuer(&self) -> String {
        let iss = match &self.issuer {
            Some(i) => i.clone(),
            None => format!("https://{}", self.listen.http),
        };
        iss.trim_end_matches('/').to_owned()
    }

    /// The introspection grants, parsed.
    pub fn introspection_grants(&self) -> Result<Vec<IntrospectionGrant>, ConfigError> {
        self.introspection
            .iter()
            .map(|i| {
                let auds = i
                    .audiences
                    .iter()
                    .map(|a| {
                        Pattern::new(a)
                            .map_err(|e| ConfigError::Invalid(format!("introspection: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(IntrospectionGrant {
                    clients: i.clients.clone(),
                    audiences: auds,
                })
            })
            .collect()
    }

    /// The embedded store's file.
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("leases.redb")
    }

    /// Where audit records go: as configured, else by the store.
    pub fn audit_sink(&self) -> AuditSinkKind {
        match (self.audit.sink, &self.store) {
            (Some(kind), _) => kind,
            (None, StoreKind::Redis) => AuditSinkKind::Redis,
            (None, _) => AuditSinkKind::File,
        }
    }

    /// How the file trail rotates and what it keeps.
    pub fn audit_file_options(&self) -> crate::audit::FileOptions {
        crate::audit::FileOptions {
            rotate_bytes: self.audit.rotate_size,
            rotate_age: self.audit.rotate_age,
            retention: self.audit.retention,
        }
    }

    /// The audit file, for `[audit] sink = "file"`.
    pub fn audit_path(&self) -> PathBuf {
        self.audit
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit.jsonl"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        trust_domain = "example.org"
        data_dir = "data"
        [listen]
        grpc = "127.0.0.1:1"
        http = "127.0.0.1:2"
        [tls]
        cert = "c.pem"
        key = "/abs/k.pem"
        trust_bundle = "b.pem"
        [policy]
        dir = "policies"
    "#;

    #[test]
    fn defaults_and_relative_paths() {
        let c = Config::parse(MINIMAL, Path::new("/etc/mayfly")).unwrap();
        assert_eq!(c.data_dir, Path::new("/etc/mayfly/data"));
        assert_eq!(c.policy.dir, Path::new("/etc/mayfly/policies"));
        assert_eq!(c.tls.key, Path::new("/abs/k.pem"));
        assert_eq!(c.tokens.default_ttl, Duration::from_secs(300));
        assert_eq!(c.tokens.max_ttl, Duration::from_secs(900));
        assert_eq!(c.tasks.max_ttl, Duration::from_secs(8 * 3600));
        assert_eq!(c.store, StoreKind::Embedded);
        assert_eq!(c.issuer(), "https://127.0.0.1:2");
    }

    #[test]
    fn a_redis_password_never_shows_in_debug() {
        let r = RedisConfig {
            url: Some("redis://:hunter2@db:6379/0".into()),
            sentinels: vec!["redis://u:hunter3@s1:26379".into()],
            ..Default::default()
        };
        let shown = format!("{r:?}");
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(
            shown.contains("redis://db:6379/0") && shown.contains("s1:26379"),
            "{shown}"
        );
    }

    #[test]
    fn the_audit_trail_follows_the_store_unless_told() {
        let base = Path::new("/etc/mayfly");
        let c = Config::parse(MINIMAL, base).unwrap();
        assert_eq!(c.audit_sink(), AuditSinkKind::File);
        assert_eq!(c.audit_path(), Path::new("/etc/mayfly/data/audit.jsonl"));
        let redis = format!("store = \"redis://127.0.0.1:6379\"\n{MINIMAL}");
        assert_eq!(
            Config::parse(&redis, base).unwrap().audit_sink(),
            AuditSinkKind::Redis
        );
        let own_file = format!("{redis}\n[audit]\nsink = \"file\"\npath = \"a.jsonl\"");
        let c = Config::parse(&own_file, base).unwrap();
        assert_eq!(c.audit_sink(), AuditSinkKind::File);
        assert_eq!(c.audit_path(), Path::new("/etc/mayfly/a.jsonl"));
        let sized =
            format!("{own_file}\nrotate_size = \"8MiB\"\nrotate_age = \"1h\"\nretention = \"30d\"");
        let o = Config::parse(&sized, base).unwrap().audit_file_options();
        assert_eq!(o.rotate_bytes, 8 << 20);
        assert_eq!(o.rotate_age, Duration::from_secs(3600));
        assert_eq!(o.retention, Some(Duration::from_secs(30 * 86_400)));
        for (extra, says) in [
            ("sink = \"redis\"", "needs store = \"redis\""),
            (
                "sink = \"stdout\"\npath = \"a\"",
                "only for sink = \"file\"",
            ),
            ("sink = \"syslog\"", "syslog"),
            ("rotate_size = \"1KiB\"", "at least 4KiB"),
            ("rotate_size = \"lots\"", "KiB, MiB or GiB"),
            ("retention = \"5m\"", "at least 1h"),
        ] {
            let text = format!("{MINIMAL}\n[audit]\n{extra}");
            let e = Config::parse(&text, base).unwrap_err().to_string();
            assert!(e.contains(says), "{extra}: {e}");
        }
    }

    #[test]
    fn rejects_bad_values_with_a_reason() {
        let unknown = format!("{MINIMAL}\nbogus = 1");
        let e = Config::parse(&unknown, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let bad_ttl = MINIMAL.replace("[tls]", "[tokens]\ndefault_ttl = \"1h\"\n[tls]");
        let e = Config::parse(&bad_ttl, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("default_ttl <= max_ttl"), "{e}");
        let bad_duration = MINIMAL.replace("[tls]", "[tokens]\nmax_ttl = \"soon\"\n[tls]");
        let e = Config::parse(&bad_duration, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"soon\""), "{e}");
        let sub_second = MINIMAL.replace("[tls]", "[tokens]\nmax_ttl = \"1500ms\"\n[tls]");
        let e = Config::parse(&sub_second, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tokens.max_ttl must be a whole number of seconds"),
            "{e}"
        );
        let bad_store = format!("store = \"mongodb\"\n{MINIMAL}");
        let e = Config::parse(&bad_store, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown store"), "{e}");
        let bad_intro = format!(
            "{MINIMAL}\n[[introspection]]\nclients = [\"spiffe://example.org/a/*\"]\naudiences = [\"a*b\"]"
        );
        let e = Config::parse(&bad_intro, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("only at the end"), "{e}");
        let no_policy = MINIMAL.replace("[policy]\n        dir = \"policies\"", "");
        let e = Config::parse(&no_policy, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("policy"), "{e}");
    }

    #[test]
    fn connection_bounds_must_keep_room_for_authenticated_callers() {
        let c = Config::parse(MINIMAL, Path::new(".")).unwrap();
        assert_eq!(c.connections.max, 4096);
        assert_eq!(c.connections.idle_timeout, Duration::from_secs(300));
        let ok = format!(
            "{MINIMAL}\n[connections]\nmax = 100\nmax_unauthenticated = 10\nmax_unauthenticated_per_source = 2\nidle_timeout = \"1m\""
        );
        let c = Config::parse(&ok, Path::new(".")).unwrap();
        assert_eq!(c.connections.max_unauthenticated_per_source, 2);
        for bad in [
            "max = 10\nmax_unauthenticated = 10",
            "max_unauthenticated_per_source = 0",
            "max_unauthenticated = 10\nmax_unauthenticated_per_source = 11",
            "idle_timeout = \"0s\"",
        ] {
            let text = format!("{MINIMAL}\n[connections]\n{bad}");
            let e = Config::parse(&text, Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(e.contains("connections:"), "{bad}: {e}");
        }
    }

    #[test]
    fn redis_store_settings() {
        let redis = MINIMAL.replace(
            "[listen]",
            "store = \"redis\"\n[redis]\nurl = \"redis://127.0.0.1:6379/0\"\n[listen]",
        );
        let c = Config::parse(&redis, Path::new("/etc/mayfly")).unwrap();
        assert_eq!(c.store, StoreKind::Redis);
        assert_eq!(c.redis.unwrap().key_prefix, "mayfly");
        let short = format!("store = \"rediss://u:secret@r.example:6380/0\"\n{MINIMAL}");
        let c = Config::parse(&short, Path::new("/etc/mayfly")).unwrap();
        assert_eq!(c.store, StoreKind::Redis);
        let r = c.redis.unwrap();
        assert_eq!(r.url.as_deref(), Some("rediss://u:secret@r.example:6380/0"));
        assert_eq!(r.key_prefix, "mayfly");
        let both = format!(
            "store = \"redis://a:1\"\n{}",
            MINIMAL.replace("[listen]", "[redis]\nurl = \"redis://b:2\"\n[listen]")
        );
        let e = Config::parse(&both, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("give one"), "{e}");
        let sentinel = MINIMAL.replace(
            "[listen]",
            "store = \"redis\"\n[redis]\nsentinels = [\"redis://10.0.0.1:26379\"]\nmaster_name = \"m\"\npassword_file = \"pw\"\n[listen]",
        );
        let c = Config::parse(&sentinel, Path::new("/etc/mayfly")).unwrap();
        assert_eq!(
            c.redis.unwrap().password_file.unwrap(),
            Path::new("/etc/mayfly/pw")
        );
        for (bad, want) in [
            ("store = \"redis\"\n", "needs a [redis] section"),
            ("store = \"redis\"\n[redis]\n", "exactly one of"),
            (
                "store = \"redis\"\n[redis]\nsentinels = [\"redis://h:1\"]\n",
                "master_name",
            ),
            (
                "store = \"redis\"\n[redis]\nurl = \"http://h\"\n",
                "must start with redis://",
            ),
            ("[redis]\nurl = \"redis://h\"\n", "needs store = \"redis\""),
        ] {
            let text = MINIMAL.replace("[listen]", &format!("{bad}[listen]"));
            let e = Config::parse(&text, Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn kubernetes_configmap_parses() {
        let yaml = include_str!("../../../deploy/kubernetes/configmap.yaml");
        let toml: String = yaml
            .lines()
            .skip_while(|l| !l.contains("mayfly.toml: |"))
            .skip(1)
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        let c = Config::parse(&toml, Path::new("/etc/mayfly/config")).unwrap();
        assert_eq!(c.store, StoreKind::Redis);
        assert_eq!(c.audit_sink(), AuditSinkKind::Redis);
        assert_eq!(c.listen.health, Some("0.0.0.0:8712".parse().unwrap()));
        assert_eq!(
            c.redis.unwrap().url_file.unwrap(),
            Path::new("/etc/mayfly/redis/url")
        );
    }

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../../deploy/mayfly.example.toml");
        let c = Config::parse(text, Path::new("/etc/mayfly")).unwrap();
        assert_eq!(c.issuer(), "https://mayfly.prod.example.com:8711");
        assert_eq!(c.policy.dir, Path::new("/etc/mayfly/policies"));
        assert_eq!(c.audit_path(), Path::new("/var/lib/mayfly/audit.jsonl"));
    }

    #[test]
    fn dev_config_parses() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let layout = crate::dev::init(&dir.path().join("dev"), &td).unwrap();
        let c = Config::load(&layout.config).unwrap();
        assert!(c.policy.dir.join("mayfly.cedar").exists());
        mayfly_policy::CedarPolicy::load_dir(&c.policy.dir).expect("dev policies validate");
        assert_eq!(c.issuer(), "https://localhost:8711");
        assert!(
            crate::dev::init(&dir.path().join("dev"), &td).is_err(),
            "refuses to overwrite"
        );
    }
}
