//! `mayfly config check`: loads and checks everything `serve` would, one
//! finding per part, without listening, writing or creating anything (a
//! missing signing key is reported, not made). With `reach_store`, the
//! Redis store is also asked whether it answers.

use crate::store::Upkeep;
use std::path::Path;

use crate::config::{Config, ConfigError, StoreSettings};
use mayfly_core::Timestamp;

use crate::federation::FederationConfigError;
use crate::issuer::key_files;
use crate::issuer::{Algorithm, CaError, CaRing, KeyError, SigningKey, key_path};
use crate::policy::PolicyHandle;
use crate::server::StartError;
use crate::store::{RedisStore, StoreError};
use crate::tls::TlsError;

/// One part of the configuration and what became of it.
#[derive(Debug)]
pub struct Finding {
    /// The part: `configuration`, `tls`, `issuing CA`, `signing key`,
    /// `policies` or `store`.
    pub part: &'static str,
    /// What was found (said for the operator), or what is wrong with it.
    pub outcome: Result<String, CheckError>,
}

impl Finding {
    fn new(part: &'static str, outcome: Result<String, CheckError>) -> Self {
        Self { part, outcome }
    }
}

/// What is wrong with a part of the configuration: the error loading that
/// part met, in its own words.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// The file does not load, or its settings do not hold.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS material does not load, or the trust bundle holds the
    /// issuing CA.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The issuing CAs do not load.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A signing key file does not load.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The policies do not load or validate.
    #[error(transparent)]
    Policy(#[from] mayfly_policy::PolicyLoadError),
    /// A `[[federation]]` entry is unusable.
    #[error(transparent)]
    Federation(#[from] FederationConfigError),
    /// The files the Redis settings name do not load.
    #[error(transparent)]
    RedisSettings(Box<StartError>),
    /// The Redis store could not be set up.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Redis did not answer.
    #[error("Redis does not answer: {0}")]
    Unreachable(#[source] StoreError),
}

/// Checks the configuration at `path`; a finding per part, in the order
/// `serve` loads them. An unreadable or invalid file is the only finding.
pub async fn check(path: &Path, reach_store: bool) -> Vec<Finding> {
    let s = match Config::load(path).and_then(|c| c.settings()) {
        Ok(s) => s,
        Err(e) => return vec![Finding::new("configuration", Err(e.into()))],
    };
    let mut out = vec![Finding::new(
        "configuration",
        Ok(format!(
            "trust domain {}, issuer {}",
            s.trust_domain, s.issuer
        )),
    )];
    out.push(Finding::new(
        "tls",
        match &s.tls.workload_api {
            Some(endpoint) => Ok(format!(
                "from the SPIFFE Workload API at {endpoint} (not contacted)"
            )),
            None => crate::tls::load(&s.tls, None)
                .map(|_| {
                    format!(
                        "server certificate {}, trust bundle {}",
                        s.tls.cert.display(),
                        s.tls.trust_bundle.display()
                    )
                })
                .map_err(CheckError::from),
        },
    ));
    out.push(Finding::new(
        "issuing CA",
        match &s.ca {
            None => Ok("none: task certificates are not issued".into()),
            Some(files) => CaRing::load(files, "")
                .map_err(CheckError::from)
                .and_then(|cas| {
                    crate::tls::refuse_issuing_ca_in_bundle(&s.tls, &cas)
                        .map_err(CheckError::from)
                        .map(|()| cas.all().len())
                })
                .map(|n| match n {
                    1 => format!("{}", files.cert.display()),
                    n => format!("{} and {} scheduled", files.cert.display(), n - 1),
                }),
        },
    ));
    out.push(Finding::new(
        "signing key",
        signing_key(&s.data_dir, s.algorithm),
    ));
    out.push(Finding::new(
        "policies",
        PolicyHandle::load(&s.policy.dir)
            .map(|p| format!("{} in {}", p.len(), s.policy.dir.display()))
            .map_err(CheckError::from),
    ));
    if !s.federation.is_empty() {
        out.push(Finding::new(
            "workload token issuers",
            crate::federation::Federation::load(&s.federation, &s.issuer, &s.trust_domain)
                .map(|_| {
                    let names: Vec<String> = s
                        .federation
                        .iter()
                        .map(|f| {
                            let name = match (&f.issuer, f.workload_api) {
                                (Some(i), _) => i.clone(),
                                (None, true) => "JWT-SVIDs (bundle from the Workload API)".into(),
                                (None, false) => "JWT-SVIDs".into(),
                            };
                            if f.single_use {
                                name
                            } else {
                                format!(
                                    "{name} (tokens reusable for up to {})",
                                    humantime::format_duration(f.max_age)
                                )
                            }
                        })
                        .collect();
                    names.join(", ")
                })
                .map_err(CheckError::from),
        ));
    }
    out.push(Finding::new("store", store(&s.store, reach_store).await));
    out
}

fn signing_key(data_dir: &Path, alg: Algorithm) -> Result<String, CheckError> {
    let files = if data_dir.exists() {
        key_files(data_dir)?
    } else {
        Vec::new()
    };
    if !files.iter().any(|f| f.alg == alg) {
        return Ok(format!(
            "{} does not exist yet: serve creates it (replicas must share one: mayfly keygen)",
            key_path(data_dir, alg).display()
        ));
    }
    let mut found = Vec::new();
    for f in &files {
        let key = SigningKey::load(&f.path, f.alg)?;
        let from = if f.from == 0 {
            String::new()
        } else {
            format!(
                ", signs from {}",
                crate::audit::rfc3339(Timestamp::from_secs(f.from))
            )
        };
        found.push(format!(
            "{} ({}, kid {}{from})",
            f.path.display(),
            key.alg(),
            key.kid()
        ));
    }
    Ok(found.join("; "))
}

async fn store(settings: &StoreSettings, reach: bool) -> Result<String, CheckError> {
    match settings {
        StoreSettings::Embedded { path, .. } => Ok(format!("embedded at {}", path.display())),
        StoreSettings::Redis { redis, .. } if reach => {
            let target = crate::server::redis_target(redis)
                .map_err(|e| CheckError::RedisSettings(Box::new(e)))?;
            let store = RedisStore::new(target, &redis.key_prefix, std::time::Duration::ZERO)?;
            store
                .check()
                .await
                .map(|()| "Redis answers".into())
                .map_err(CheckError::Unreachable)
        }
        StoreSettings::Redis { .. } => Ok("Redis (not contacted; --store asks it)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that does not load is the one finding, its error kept whole.
    #[tokio::test]
    async fn a_missing_file_is_the_only_finding() {
        let dir = tempfile::tempdir().unwrap();
        let findings = check(&dir.path().join("mayfly.toml"), false).await;
        assert_eq!(findings.len(), 1);
        let Err(e) = &findings[0].outcome else {
            panic!("{findings:?}");
        };
        assert!(
            matches!(e, CheckError::Config(ConfigError::Read { .. })),
            "{e:?}"
        );
        assert!(e.to_string().contains("mayfly.toml"), "{e}");
    }
}
