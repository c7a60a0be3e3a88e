//! `mayfly.toml`: everything the broker needs to start. Relative paths are
//! resolved against the file's directory.
//!
//! - `mod.rs`: [`Config`], loading and checking it, and what is derived from
//!   it (paths, the audit sink, introspection grants);
//! - `sections.rs`: each `[section]` and its defaults;
//! - `values.rs`: how sizes and durations are written.

mod sections;
#[cfg(test)]
mod tests;
mod values;

use sections::default_prefix;
pub use sections::*;

use std::path::{Path, PathBuf};
use std::time::Duration;

use mayfly_core::{Pattern, SpiffeIdPattern, TrustDomain};

use crate::service::IntrospectionGrant;
use serde::Deserialize;

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
