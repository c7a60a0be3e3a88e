//! `mayfly.toml`: everything the broker needs to start. Relative paths are
//! resolved against the file's directory.
//!
//! - `mod.rs`: [`Config`] as written, loading it, and what is derived from
//!   it (paths, the issuer, the audit sink);
//! - `settings.rs`: [`Settings`], the configuration checked once and
//!   resolved into what the broker is built from;
//! - `sections.rs`: each `[section]` and its defaults;
//! - `values.rs`: how sizes and durations are written.

mod sections;
mod settings;
#[cfg(test)]
mod tests;
mod values;

use crate::issuer::CaFiles;
use sections::default_prefix;
pub use sections::{
    Approvals, Audit, AuditSinkKind, Certificates, Connections, FederatedBundle, FederationConfig,
    Feed, GatewayConfig, IntrospectionConfig, Listen, PolicyConfig, RateLimit, Reaper, RedisConfig,
    ResourceServerConfig, Ssf, StoreKind, Tasks, Tls, Tokens,
};
pub use settings::{
    FeedSettings, Gateway, IntrospectionGrant, KeyRotation, Lifetimes, RedisEndpoint,
    RedisSettings, RedisTrail, ResourceServer, Settings, StoreSettings, Trail,
};

use std::path::{Path, PathBuf};

use mayfly_core::{SpiffeIdPattern, TrustDomain};
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
    /// Which workloads receive tokens for which audiences: they alone may
    /// exchange (and introspect) those tokens.
    #[serde(default)]
    pub resource_servers: Vec<ResourceServerConfig>,
    /// Gateways that may ask about tool calls, and what they front.
    #[serde(default)]
    pub gateways: Vec<GatewayConfig>,
    /// Databases the broker makes logins in (`mayfly-secrets`).
    #[serde(default)]
    pub databases: Vec<mayfly_secrets::DatabaseConfig>,
    /// The audit trail.
    #[serde(default)]
    pub audit: Audit,
    /// How long and how many connections each port holds.
    #[serde(default)]
    pub connections: Connections,
    /// The Shared Signals transmitter.
    #[serde(default)]
    pub ssf: Ssf,
    /// Issuers of workload identity tokens accepted instead of a client
    /// certificate.
    #[serde(default)]
    pub federation: Vec<FederationConfig>,
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
        paths.extend(config.tls.federated.iter_mut().map(|f| &mut f.bundle));
        for f in &mut config.federation {
            paths.extend(
                [&mut f.ca, &mut f.jwks_file, &mut f.spiffe_bundle]
                    .into_iter()
                    .flatten(),
            );
        }
        if let Some(p) = config.audit.path.as_mut() {
            paths.push(p);
        }
        if let Some(ca) = config.ca.as_mut() {
            paths.extend([&mut ca.cert, &mut ca.key]);
        }
        for d in &mut config.databases {
            paths.extend([&mut d.password_file, &mut d.ca_file].into_iter().flatten());
        }
        if let Some(r) = config.redis.as_mut() {
            paths.extend(
                [&mut r.url_file, &mut r.password_file, &mut r.ca]
                    .into_iter()
                    .flatten(),
            );
        }
        for p in paths {
            // An unset path (TLS from the Workload API) stays unset.
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        }
        config.settings()?;
        Ok(config)
    }

    /// The issuer URL (`iss`), without a trailing slash.
    pub fn issuer(&self) -> String {
        let iss = match &self.issuer {
            Some(i) => i.clone(),
            None => format!("https://{}", self.listen.http),
        };
        iss.trim_end_matches('/').to_owned()
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
