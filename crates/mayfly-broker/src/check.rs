//! `mayfly config check`: loads and checks everything `serve` would, one
//! finding per part, without listening, writing or creating anything (a
//! missing signing key is reported, not made). With `reach_store`, the
//! Redis store is also asked whether it answers.

use std::path::Path;

use crate::config::{Config, StoreSettings};
use mayfly_core::Timestamp;

use crate::issuer::key_files;
use crate::issuer::{Algorithm, CaRing, SigningKey, key_path};
use crate::policy::PolicyHandle;
use crate::store::LeaseStore;
use crate::store::RedisStore;

/// One part of the configuration and what became of it.
#[derive(Debug)]
pub struct Finding {
    /// The part: `configuration`, `tls`, `issuing CA`, `signing key`,
    /// `policies` or `store`.
    pub part: &'static str,
    /// What was found, or what is wrong with it.
    pub outcome: Result<String, String>,
}

impl Finding {
    fn new(part: &'static str, outcome: Result<String, String>) -> Self {
        Self { part, outcome }
    }
}

/// Checks the configuration at `path`; a finding per part, in the order
/// `serve` loads them. An unreadable or invalid file is the only finding.
pub async fn check(path: &Path, reach_store: bool) -> Vec<Finding> {
    let s = match Config::load(path).and_then(|c| c.settings()) {
        Ok(s) => s,
        Err(e) => return vec![Finding::new("configuration", Err(e.to_string()))],
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
                .map_err(|e| e.to_string()),
        },
    ));
    out.push(Finding::new(
        "issuing CA",
        match &s.ca {
            None => Ok("none: task certificates are not issued".into()),
            Some(files) => CaRing::load(files, "")
                .map_err(|e| e.to_string())
                .and_then(|cas| {
                    crate::tls::refuse_issuing_ca_in_bundle(&s.tls, &cas)
                        .map_err(|e| e.to_string())
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
            .map_err(|e| e.to_string()),
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
                .map_err(|e| e.to_string()),
        ));
    }
    out.push(Finding::new("store", store(&s.store, reach_store).await));
    out
}

fn signing_key(data_dir: &Path, alg: Algorithm) -> Result<String, String> {
    let files = if data_dir.exists() {
        key_files(data_dir).map_err(|e| e.to_string())?
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
        let key = SigningKey::load(&f.path, f.alg).map_err(|e| e.to_string())?;
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

async fn store(settings: &StoreSettings, reach: bool) -> Result<String, String> {
    match settings {
        StoreSettings::Embedded { path, .. } => Ok(format!("embedded at {}", path.display())),
        StoreSettings::Redis { redis, .. } if reach => {
            let target = crate::server::redis_target(redis).map_err(|e| e.to_string())?;
            let store = RedisStore::new(target, &redis.key_prefix, std::time::Duration::ZERO)
                .map_err(|e| e.to_string())?;
            store
                .check()
                .await
                .map(|()| "Redis answers".into())
                .map_err(|e| format!("Redis does not answer: {e}"))
        }
        StoreSettings::Redis { .. } => Ok("Redis (not contacted; --store asks it)".into()),
    }
}
