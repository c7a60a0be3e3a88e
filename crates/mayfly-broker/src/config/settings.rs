//! A configuration checked once and resolved into [`Settings`]: what the
//! broker is built from. Every rule about how values fit together lives in
//! [`Config::settings`]; what comes out can only describe a broker that
//! can be built (a Redis trail only with the Redis store, a Redis store
//! with exactly one way to reach it), so assembly matches it exhaustively
//! and checks nothing again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mayfly_core::{Audience, Pattern, SpiffeId, SpiffeIdPattern, TrustDomain, check_upstream};

use super::{
    AuditSinkKind, Config, ConfigError, Connections, FederationConfig, PolicyConfig, RateLimit,
    Reaper, StoreKind, Tls,
};
use crate::audit::FileOptions;
use crate::issuer::{Algorithm, CaFiles};
use crate::redis_conn::redact;

/// What the broker is built from.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The trust domain agents and operators belong to.
    pub trust_domain: TrustDomain,
    /// The identity the broker acts as on its own (revoking after a policy
    /// reload, undoing an unrecorded write).
    pub broker_id: SpiffeId,
    /// `iss` of every token, without a trailing slash.
    pub issuer: String,
    /// Where keys (and the embedded store) live.
    pub data_dir: PathBuf,
    /// The lease store, and the audit trail beside it.
    pub store: StoreSettings,
    /// Server certificate and trust bundle.
    pub tls: Tls,
    /// Who may call the Admin API.
    pub operators: Vec<SpiffeIdPattern>,
    /// The token signing algorithm.
    pub algorithm: Algorithm,
    /// How often the key files are looked at.
    pub key_reload: Duration,
    /// How long a superseded key stays published after its successor
    /// started: the longest token life plus validators' leeway.
    pub key_retire_after: Duration,
    /// `tokens.rotate_every` and `rotate_lead`, when the broker rotates
    /// its signing key itself.
    pub key_rotation: Option<KeyRotation>,
    /// Every lifetime the service applies.
    pub lifetimes: Lifetimes,
    /// The issuing CA's files, when task certificates are signed.
    pub ca: Option<CaFiles>,
    /// Workload-token issuers (`[[federation]]`).
    pub federation: Vec<FederationConfig>,
    /// The CRL's nextUpdate − thisUpdate.
    pub crl_validity: Duration,
    /// The Token Status Lists' `ttl`.
    pub status_list_ttl: Duration,
    /// Where receivers' push endpoints may be.
    pub ssf_push: mayfly_ssf::PushPolicy,
    /// Expiry and clean-up.
    pub reaper: Reaper,
    /// The revocation feed.
    pub feed: FeedSettings,
    /// The policies.
    pub policy: PolicyConfig,
    /// Per-agent issuance limit.
    pub rate_limit: RateLimit,
    /// Who may introspect tokens of which audiences (`[[introspection]]`
    /// and every resource server for its own audiences).
    pub introspection: Vec<IntrospectionGrant>,
    /// Who receives tokens of which audiences: only they may exchange them.
    pub resource_servers: Vec<ResourceServer>,
    /// The gateways that may ask about tool calls.
    pub gateways: Vec<Gateway>,
    /// The databases logins are made in, checked (not yet connected).
    pub databases: Vec<Arc<dyn mayfly_secrets::Engine>>,
    /// How long and how many connections each port holds.
    pub connections: Connections,
}

/// The lease store, with the trails it can have: the Redis store's own
/// stream exists only beside the Redis store.
#[derive(Debug, Clone)]
pub enum StoreSettings {
    /// A redb file, one node.
    Embedded {
        /// The file.
        path: PathBuf,
        /// Where audit records go.
        trail: Trail,
    },
    /// A Redis shared by every replica.
    Redis {
        /// Where it is and how keys are named.
        redis: RedisSettings,
        /// Where audit records go.
        trail: RedisTrail,
    },
}

/// A trail outside the store.
#[derive(Debug, Clone)]
pub enum Trail {
    /// A JSON-lines file, rotated.
    File {
        /// The active file.
        path: PathBuf,
        /// Rotation and retention.
        options: FileOptions,
    },
    /// Standard output, for log pipelines.
    Stdout,
    /// No trail.
    Off,
}

/// The trail beside the Redis store.
#[derive(Debug, Clone)]
pub enum RedisTrail {
    /// The store's own stream: one chain for every replica, leases and
    /// records in one script.
    Stream {
        /// Delete entries older than this.
        retention: Option<Duration>,
    },
    /// A trail outside the store.
    Outside(Trail),
}

/// `[redis]`, resolved.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// How to reach it.
    pub endpoint: RedisEndpoint,
    /// PEM CA for `rediss://` with a private CA.
    pub ca: Option<PathBuf>,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Replicas that must acknowledge each write (`WAIT`).
    pub replicas_to_ack: u32,
}

/// Exactly one way to reach Redis.
#[derive(Clone)]
pub enum RedisEndpoint {
    /// A `redis://` or `rediss://` URL (it may hold a password).
    Url(String),
    /// A file holding the URL, read at start.
    UrlFile(PathBuf),
    /// The primary the Sentinels name.
    Sentinel {
        /// `redis://host:port` of each Sentinel.
        sentinels: Vec<String>,
        /// The primary's name.
        master_name: String,
        /// A file holding the data nodes' password.
        password_file: Option<PathBuf>,
    },
}

impl std::fmt::Debug for RedisEndpoint {
    /// URLs without their credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Url(url) => write!(f, "Url({})", redact(url)),
            Self::UrlFile(path) => f.debug_tuple("UrlFile").field(path).finish(),
            Self::Sentinel {
                sentinels,
                master_name,
                password_file,
            } => f
                .debug_struct("Sentinel")
                .field(
                    "sentinels",
                    &sentinels.iter().map(|s| redact(s)).collect::<Vec<_>>(),
                )
                .field("master_name", master_name)
                .field("password_file", password_file)
                .finish(),
        }
    }
}

/// The broker's own signing-key rotation (`tokens.rotate_every`).
pub use crate::issuer::KeyRotation;

/// Every lifetime the service applies to what it issues.
#[derive(Debug, Clone)]
pub struct Lifetimes {
    /// Token TTL when the request asks for 0.
    pub token_default_ttl: Duration,
    /// No token lives longer.
    pub token_max_ttl: Duration,
    /// Task TTL when the request asks for 0.
    pub task_default_ttl: Duration,
    /// No task lives longer.
    pub task_max_ttl: Duration,
    /// Certificate TTL when the request asks for 0.
    pub cert_default_ttl: Duration,
    /// No certificate lives longer.
    pub cert_max_ttl: Duration,
    /// How long an approval may wait for a decision and then for use.
    pub approval_ttl: Duration,
    /// How many delegations may separate a task from its root.
    pub max_delegation_depth: usize,
    /// Per database (`[[databases]]` name): a login's default and maximum
    /// lifetime, the token lifetimes where the entry sets none.
    pub databases: std::collections::BTreeMap<String, (Duration, Duration)>,
}

impl Lifetimes {
    /// The default and maximum lifetime of a login in `database`.
    pub fn database(&self, database: &str) -> (Duration, Duration) {
        self.databases
            .get(database)
            .copied()
            .unwrap_or((self.token_default_ttl, self.token_max_ttl))
    }
}

/// Who may introspect tokens of which audiences (`[[introspection]]`).
#[derive(Debug, Clone)]
pub struct IntrospectionGrant {
    /// Resource servers' SPIFFE ID patterns.
    pub clients: Vec<SpiffeIdPattern>,
    /// Audiences whose tokens they may inspect.
    pub audiences: Vec<Pattern>,
}

/// One `[[resource_servers]]`, checked: the workloads that receive tokens
/// issued for these audiences.
#[derive(Debug, Clone)]
pub struct ResourceServer {
    /// Its name, unique among resource servers.
    pub name: String,
    /// Its workloads' SPIFFE ID patterns.
    pub clients: Vec<SpiffeIdPattern>,
    /// The audiences of the tokens it receives.
    pub audiences: Vec<Pattern>,
}

impl ResourceServer {
    /// The first resource server (in configuration order) that `caller` is
    /// one of and that receives tokens for `audience`: the one a token
    /// exchange by `caller` of such a token goes as.
    pub fn find<'a>(
        servers: &'a [ResourceServer],
        caller: &SpiffeId,
        audience: &str,
    ) -> Option<&'a ResourceServer> {
        servers.iter().find(|r| {
            r.clients.iter().any(|p| p.matches(caller))
                && r.audiences.iter().any(|p| p.matches(audience))
        })
    }
}

/// One `[[gateways]]`, checked.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// Each upstream it fronts, with the audience of its tokens.
    pub upstreams: std::collections::BTreeMap<String, Audience>,
}

/// `[feed]`, resolved.
#[derive(Debug, Clone)]
pub struct FeedSettings {
    /// Who may watch it.
    pub watchers: Vec<SpiffeIdPattern>,
    /// Heartbeat on a quiet feed.
    pub heartbeat: Duration,
    /// How often to pick up other replicas' revocations.
    pub poll: Duration,
}

type Checked<T> = Result<T, ConfigError>;

fn invalid<T>(message: impl Into<String>) -> Checked<T> {
    Err(ConfigError::Invalid(message.into()))
}

impl Config {
    /// Checks how the values fit together and resolves them into what the
    /// broker is built from. `Config::parse` runs it, so a file that loads
    /// is one a broker can be built from; a `Config` changed after loading
    /// is checked again here.
    pub fn settings(&self) -> Checked<Settings> {
        Ok(Settings {
            trust_domain: self.trust_domain.clone(),
            broker_id: SpiffeId::new(&format!("spiffe://{}/mayfly/broker", self.trust_domain))
                .map_err(|e| ConfigError::Invalid(e.to_string()))?,
            issuer: self.checked_issuer()?,
            data_dir: self.data_dir.clone(),
            store: self.store_settings()?,
            tls: self.checked_tls()?,
            operators: self.operators.clone(),
            algorithm: self.tokens.algorithm,
            key_reload: self.tokens.key_reload_interval,
            key_retire_after: self.tokens.max_ttl + self.tokens.retire_grace,
            key_rotation: self.key_rotation()?,
            lifetimes: self.lifetimes()?,
            ca: self.ca.clone(),
            federation: self.checked_federation()?,
            crl_validity: self.certificates.crl_validity,
            status_list_ttl: self.tokens.status_list_ttl,
            ssf_push: self.checked_ssf()?,
            reaper: self.checked_reaper()?,
            feed: self.feed_settings()?,
            policy: self.checked_policy()?,
            rate_limit: self.rate_limit.clone(),
            introspection: self.introspection_grants()?,
            resource_servers: self.resource_servers()?,
            gateways: self.gateways()?,
            databases: self.databases()?,
            connections: self.checked_connections()?,
        })
    }

    fn checked_issuer(&self) -> Checked<String> {
        if let Some(iss) = &self.issuer
            && !iss.starts_with("https://")
        {
            return invalid(format!("issuer {iss:?} must be an https:// URL"));
        }
        Ok(self.issuer())
    }

    fn key_rotation(&self) -> Checked<Option<KeyRotation>> {
        let t = &self.tokens;
        let Some(every) = t.rotate_every else {
            return Ok(None);
        };
        if t.rotate_lead <= t.key_reload_interval {
            return invalid(
                "tokens.rotate_lead must be longer than tokens.key_reload_interval, so that \
                 every replica publishes the next key before it signs",
            );
        }
        if every <= t.rotate_lead {
            return invalid("tokens.rotate_every must be longer than tokens.rotate_lead");
        }
        Ok(Some(KeyRotation {
            every,
            lead: t.rotate_lead,
        }))
    }

    fn lifetimes(&self) -> Checked<Lifetimes> {
        let (tokens, tasks, certs) = (&self.tokens, &self.tasks, &self.certificates);
        let whole = [
            ("tokens.default_ttl", tokens.default_ttl),
            ("tokens.max_ttl", tokens.max_ttl),
            ("tasks.default_ttl", tasks.default_ttl),
            ("tasks.max_ttl", tasks.max_ttl),
            ("certificates.default_ttl", certs.default_ttl),
            ("certificates.max_ttl", certs.max_ttl),
            ("certificates.crl_validity", certs.crl_validity),
            ("tokens.status_list_ttl", tokens.status_list_ttl),
        ];
        for (name, d) in whole {
            if d.subsec_nanos() != 0 || d.is_zero() {
                return invalid(format!(
                    "{name} must be a whole number of seconds, at least 1s"
                ));
            }
        }
        if tokens.default_ttl > tokens.max_ttl {
            return invalid("tokens: need 0 < default_ttl <= max_ttl");
        }
        if tasks.default_ttl > tasks.max_ttl {
            return invalid("tasks: need 0 < default_ttl <= max_ttl");
        }
        if certs.default_ttl > certs.max_ttl {
            return invalid("certificates: need default_ttl <= max_ttl");
        }
        Ok(Lifetimes {
            token_default_ttl: tokens.default_ttl,
            token_max_ttl: tokens.max_ttl,
            task_default_ttl: tasks.default_ttl,
            task_max_ttl: tasks.max_ttl,
            cert_default_ttl: certs.default_ttl,
            cert_max_ttl: certs.max_ttl,
            approval_ttl: self.approvals.ttl,
            max_delegation_depth: tasks.max_delegation_depth,
            databases: self
                .databases
                .iter()
                .map(|d| {
                    let (default, max) = d
                        .lifetimes()
                        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
                    let max = max.unwrap_or(tokens.max_ttl);
                    let default = default.unwrap_or(tokens.default_ttl.min(max));
                    if default > max {
                        return invalid(format!(
                            "[[databases]] {:?}: default_ttl is longer than max_ttl",
                            d.name
                        ));
                    }
                    Ok((d.name.clone(), (default, max)))
                })
                .collect::<Checked<_>>()?,
        })
    }

    fn store_settings(&self) -> Checked<StoreSettings> {
        let trail = self.trail()?;
        match (&self.store, &self.redis) {
            (StoreKind::Embedded, None) => Ok(StoreSettings::Embedded {
                path: self.store_path(),
                trail: match trail {
                    RedisTrail::Outside(t) => t,
                    RedisTrail::Stream { .. } => {
                        return invalid("[audit] sink = \"redis\" needs store = \"redis\"");
                    }
                },
            }),
            (StoreKind::Redis, Some(_))
                if matches!(trail, RedisTrail::Outside(Trail::File { .. })) =>
            {
                invalid(
                    "[audit] sink = \"file\" cannot be used with store = \"redis\": a lease in \
                     Redis and its record in a local file cannot be written together, so a crash \
                     between them would leave a credential unrecorded. Use sink = \"redis\" (the \
                     default with this store: leases and records in one script, one trail for \
                     every replica) and export it with mayfly audit tail --all",
                )
            }
            (StoreKind::Redis, Some(r)) => Ok(StoreSettings::Redis {
                redis: RedisSettings {
                    endpoint: redis_endpoint(r)?,
                    ca: r.ca.clone(),
                    key_prefix: r.key_prefix.clone(),
                    replicas_to_ack: r.replicas_to_ack,
                },
                trail,
            }),
            (StoreKind::Redis, None) => invalid("store = \"redis\" needs a [redis] section"),
            (StoreKind::Embedded, Some(_)) => invalid("a [redis] section needs store = \"redis\""),
            (StoreKind::RedisUrl(_), _) => invalid("store URL not resolved"),
        }
    }

    /// The trail as configured; a Redis stream is refused by the caller
    /// where there is no Redis store.
    fn trail(&self) -> Checked<RedisTrail> {
        let audit = &self.audit;
        let sink = self.audit_sink();
        if audit.path.is_some() && sink != AuditSinkKind::File {
            return invalid("[audit] path is only for sink = \"file\"");
        }
        if audit.rotate_size < 4096 || audit.rotate_age < Duration::from_secs(60) {
            return invalid("[audit] rotate_size must be at least 4KiB and rotate_age at least 1m");
        }
        if audit
            .retention
            .is_some_and(|r| r < Duration::from_secs(3600))
        {
            return invalid("[audit] retention must be at least 1h");
        }
        Ok(match sink {
            AuditSinkKind::File => RedisTrail::Outside(Trail::File {
                path: self.audit_path(),
                options: self.audit_file_options(),
            }),
            AuditSinkKind::Redis => RedisTrail::Stream {
                retention: audit.retention,
            },
            AuditSinkKind::Stdout => RedisTrail::Outside(Trail::Stdout),
            AuditSinkKind::Off => RedisTrail::Outside(Trail::Off),
        })
    }

    fn checked_ssf(&self) -> Checked<mayfly_ssf::PushPolicy> {
        let push = mayfly_ssf::PushPolicy {
            endpoints: self.ssf.push_endpoints.clone(),
            loopback_http: self.ssf.allow_loopback_http,
        };
        match push.check() {
            Ok(()) => Ok(push),
            Err(e) => invalid(e),
        }
    }

    fn checked_reaper(&self) -> Checked<Reaper> {
        if self.reaper.interval.is_zero() {
            return invalid("reaper.interval must be positive");
        }
        Ok(self.reaper.clone())
    }

    fn feed_settings(&self) -> Checked<FeedSettings> {
        if self.feed.heartbeat.is_zero() || self.feed.poll.is_zero() {
            return invalid("feed.heartbeat and feed.poll must be positive");
        }
        Ok(FeedSettings {
            watchers: self.feed_watchers(),
            heartbeat: self.feed.heartbeat,
            poll: self.feed.poll,
        })
    }

    fn checked_tls(&self) -> Checked<Tls> {
        let t = &self.tls;
        let files = [&t.cert, &t.key, &t.trust_bundle].map(|p| !p.as_os_str().is_empty());
        match (&t.workload_api, files) {
            (Some(_), [false, false, false]) | (None, [true, true, true]) => {}
            (Some(_), _) => {
                return invalid(
                    "[tls] workload_api gives the certificate, key and bundle; remove cert, \
                     key and trust_bundle",
                );
            }
            (None, _) => {
                return invalid(
                    "[tls] needs cert, key and trust_bundle, or workload_api (a SPIFFE \
                     Workload API endpoint)",
                );
            }
        }
        if t.reload_interval.is_zero() {
            return invalid("tls.reload_interval must be positive");
        }
        let mut seen = vec![&self.trust_domain];
        for f in &t.federated {
            if seen.contains(&&f.trust_domain) {
                return invalid(format!(
                    "[[tls.federated]] names trust domain {} twice, or the broker's own",
                    f.trust_domain
                ));
            }
            seen.push(&f.trust_domain);
            if f.bundle.as_os_str().is_empty() && t.workload_api.is_none() {
                return invalid(format!(
                    "[[tls.federated]] {} has no bundle: name its file, or take it from the \
                     SPIFFE Workload API (tls.workload_api)",
                    f.trust_domain
                ));
            }
        }
        Ok(t.clone())
    }

    fn checked_federation(&self) -> Checked<Vec<FederationConfig>> {
        if self.tls.workload_api.is_none() && self.federation.iter().any(|f| f.workload_api) {
            return invalid(
                "[[federation]] workload_api = true takes the JWT bundle from the SPIFFE \
                 Workload API: set [tls] workload_api",
            );
        }
        Ok(self.federation.clone())
    }

    fn checked_policy(&self) -> Checked<PolicyConfig> {
        if self.policy.reload_interval.is_zero() {
            return invalid("policy.reload_interval must be positive");
        }
        Ok(self.policy.clone())
    }

    fn checked_connections(&self) -> Checked<Connections> {
        let c = &self.connections;
        if c.handshake_timeout.is_zero()
            || c.idle_timeout.is_zero()
            || c.unauthenticated_idle_timeout.is_zero()
        {
            return invalid("connections: timeouts must be positive");
        }
        if !(0 < c.max_unauthenticated_per_source
            && c.max_unauthenticated_per_source <= c.max_unauthenticated
            && c.max_unauthenticated < c.max)
        {
            return invalid(
                "connections: need 0 < max_unauthenticated_per_source <= max_unauthenticated < max \
                 (the rest of max is kept for authenticated callers)",
            );
        }
        if !(1..=128).contains(&c.ipv6_source_prefix) {
            return invalid(format!(
                "connections: ipv6_source_prefix is {}, expected 1 to 128 (the bits of an IPv6 \
                 address that name one source)",
                c.ipv6_source_prefix
            ));
        }
        Ok(c.clone())
    }

    /// `[[introspection]]`, then each resource server for its own
    /// audiences: a token's recipient may always ask whether it is live.
    fn introspection_grants(&self) -> Checked<Vec<IntrospectionGrant>> {
        let mut grants = self
            .introspection
            .iter()
            .map(|i| {
                Ok(IntrospectionGrant {
                    clients: i.clients.clone(),
                    audiences: audience_patterns("[[introspection]]", &i.audiences)?,
                })
            })
            .collect::<Checked<Vec<_>>>()?;
        grants.extend(
            self.resource_servers()?
                .into_iter()
                .map(|r| IntrospectionGrant {
                    clients: r.clients,
                    audiences: r.audiences,
                }),
        );
        Ok(grants)
    }

    /// `[[resource_servers]]`: each named once, with at least one client
    /// and one audience.
    fn resource_servers(&self) -> Checked<Vec<ResourceServer>> {
        let mut seen = std::collections::BTreeSet::new();
        self.resource_servers
            .iter()
            .map(|r| {
                let at = format!("[[resource_servers]] {:?}", r.name);
                if r.name.is_empty()
                    || !r
                        .name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    return invalid(format!(
                        "{at}: a name is letters, digits, '-', '_' and '.', not empty"
                    ));
                }
                if !seen.insert(r.name.as_str()) {
                    return invalid(format!("{at} is named twice"));
                }
                if r.clients.is_empty() || r.audiences.is_empty() {
                    return invalid(format!(
                        "{at} needs clients and audiences: the workloads that receive tokens \
                         for those audiences"
                    ));
                }
                Ok(ResourceServer {
                    name: r.name.clone(),
                    clients: r.clients.clone(),
                    audiences: audience_patterns(&at, &r.audiences)?,
                })
            })
            .collect()
    }
}

impl Config {
    /// `[[databases]]`: each named once, its templates and files checked.
    fn databases(&self) -> Checked<Vec<Arc<dyn mayfly_secrets::Engine>>> {
        let mut names = std::collections::HashSet::new();
        let mut out = Vec::new();
        for d in &self.databases {
            if !names.insert(d.name.as_str()) {
                return invalid(format!("[[databases]] {:?} is listed twice", d.name));
            }
            // Paths were resolved against the file's directory when it was
            // read; relative ones (a relative `base`) stay relative to the
            // working directory.
            let engine = mayfly_secrets::load(d, Path::new("."))
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            out.push(engine);
        }
        Ok(out)
    }

    /// `[[gateways]]`: each listed once, fronting at least one upstream
    /// (a plain name, its audience a valid one); an upstream fronted by
    /// several gateways has one audience.
    fn gateways(&self) -> Checked<Vec<Gateway>> {
        let mut seen = std::collections::BTreeSet::new();
        let mut audiences: std::collections::BTreeMap<&str, &str> = Default::default();
        let mut out = Vec::new();
        for g in &self.gateways {
            let at = format!("[[gateways]] {}", g.id);
            if !seen.insert(&g.id) {
                return invalid(format!("{at} is listed twice"));
            }
            if g.upstreams.is_empty() {
                return invalid(format!("{at} needs upstreams: name = \"<audience>\""));
            }
            let mut upstreams = std::collections::BTreeMap::new();
            for (name, audience) in &g.upstreams {
                check_upstream(name).map_err(|e| ConfigError::Invalid(format!("{at}: {e}")))?;
                let aud = Audience::new(audience)
                    .map_err(|e| ConfigError::Invalid(format!("{at}: upstream {name}: {e}")))?;
                if let Some(other) = audiences.insert(name, audience)
                    && other != audience
                {
                    return invalid(format!(
                        "{at}: upstream {name} has audience {audience} here and {other} under \
                         another gateway"
                    ));
                }
                upstreams.insert(name.clone(), aud);
            }
            out.push(Gateway {
                id: g.id.clone(),
                upstreams,
            });
        }
        Ok(out)
    }
}

/// Audience patterns as written in `section`.
fn audience_patterns(section: &str, audiences: &[String]) -> Checked<Vec<Pattern>> {
    audiences
        .iter()
        .map(|a| Pattern::new(a).map_err(|e| ConfigError::Invalid(format!("{section}: {e}"))))
        .collect()
}

/// The one way `[redis]` names to reach the server.
fn redis_endpoint(r: &super::RedisConfig) -> Checked<RedisEndpoint> {
    match (&r.url, &r.url_file, r.sentinels.as_slice()) {
        (Some(url), None, []) => {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return invalid("[redis] url must start with redis:// or rediss://");
            }
            Ok(RedisEndpoint::Url(url.clone()))
        }
        (None, Some(file), []) => Ok(RedisEndpoint::UrlFile(file.clone())),
        (None, None, [first, ..]) => {
            let tls = first.starts_with("rediss://");
            for s in &r.sentinels {
                if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
                    return invalid("[redis] sentinels must start with redis:// or rediss://");
                }
                if s.starts_with("rediss://") != tls {
                    return invalid(
                        "[redis] sentinels are all redis:// or all rediss:// (TLS to the \
                         Sentinels and the data nodes, or to neither)",
                    );
                }
            }
            Ok(RedisEndpoint::Sentinel {
                sentinels: r.sentinels.clone(),
                master_name: match &r.master_name {
                    Some(m) => m.clone(),
                    None => return invalid("[redis] sentinels need master_name"),
                },
                password_file: r.password_file.clone(),
            })
        }
        _ => invalid("[redis] needs exactly one of url, url_file or sentinels"),
    }
}
