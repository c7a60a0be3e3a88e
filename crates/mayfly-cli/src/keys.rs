//! `mayfly keys`: the JWT signing-key schedule in the broker's key
//! directory (`data_dir`), which every replica follows
//! (`mayfly_broker::issuer::{key_files, load_keys, scheduled_path}`).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Subcommand;
use mayfly_broker::Config;
use mayfly_broker::issuer::{JwtSigner, SigningKey};
use mayfly_broker::issuer::{key_files, load_keys as load, scheduled_path};
use mayfly_core::Timestamp;
use serde_json::json;

/// `mayfly keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write the next signing key: published in the JWKS at once (replicas
    /// pick it up within `tokens.key_reload_interval`), signing from `--in`
    /// later; the current key stays published until its last token has
    /// expired (`tokens.max_ttl` + `tokens.retire_grace` after the switch).
    Rotate {
        /// Path to mayfly.toml.
        #[arg(long, env = "MAYFLY_CONFIG")]
        config: std::path::PathBuf,
        /// How long validators get to fetch the new key before it signs
        /// (longer than their JWKS cache; the broker says max-age=300).
        #[arg(long = "in", default_value = "10m", value_parser = humantime::parse_duration)]
        lead: Duration,
    },
    /// The key files: which signs now, which are published, which can go.
    List {
        /// Path to mayfly.toml.
        #[arg(long, env = "MAYFLY_CONFIG")]
        config: std::path::PathBuf,
    },
    /// Delete the key files no longer published (their tokens have all
    /// expired).
    Prune {
        /// Path to mayfly.toml.
        #[arg(long, env = "MAYFLY_CONFIG")]
        config: std::path::PathBuf,
    },
}

/// Unix seconds now.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unix seconds as RFC 3339.
pub(crate) fn time(secs: u64) -> String {
    mayfly_audit::rfc3339(Timestamp::from_secs(secs))
}

/// The key schedule of the configuration at `config`, as the broker would
/// apply it now.
fn schedule(config: &Path) -> anyhow::Result<(mayfly_broker::config::Settings, JwtSigner)> {
    let s = Config::load(config)?.settings()?;
    let keys = load(&s.data_dir, s.algorithm, false)?;
    let signer = JwtSigner::from_ring(s.algorithm.name(), keys, s.key_retire_after)
        .with_context(|| format!("the keys in {}", s.data_dir.display()))?;
    Ok((s, signer))
}

/// Runs a `keys` command.
pub fn run(cmd: KeysCommand, as_json: bool) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Rotate { config, lead } => {
            let (s, signer) = schedule(&config)?;
            let from = now() + lead.as_secs();
            let path = scheduled_path(&s.data_dir, s.algorithm, from);
            SigningKey::generate_file(&path, s.algorithm)?;
            let key = SigningKey::load(&path, s.algorithm)?;
            let until = from + s.key_retire_after.as_secs();
            if as_json {
                crate::output::print_json(&json!({
                    "path": path, "kid": key.kid(), "alg": key.alg(),
                    "signs_from": time(from), "replaces": signer.kid(),
                    "replaced_key_published_until": time(until),
                }));
            } else {
                println!(
                    "wrote {} ({}, kid {})",
                    path.display(),
                    key.alg(),
                    key.kid()
                );
                println!("published now; signs from {}", time(from));
                println!(
                    "kid {} signs until then and stays published until {}",
                    signer.kid(),
                    time(until)
                );
            }
        }
        KeysCommand::List { config } => {
            let (s, signer) = schedule(&config)?;
            let (active, published) = (signer.kid(), signer.published_kids());
            let mut rows = Vec::new();
            for f in key_files(&s.data_dir)? {
                let key = SigningKey::load(&f.path, f.alg)?;
                let state = if key.kid() == active {
                    "signing"
                } else if f.from > now() {
                    "next"
                } else if published.iter().any(|k| k == key.kid()) {
                    "published"
                } else {
                    "retired"
                };
                rows.push((key.kid().to_owned(), key.alg(), f.from, state, f.path));
            }
            if as_json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|(kid, alg, from, state, path)| {
                        json!({"kid": kid, "alg": alg, "signs_from": (*from > 0).then(|| time(*from)),
                               "state": state, "path": path})
                    })
                    .collect();
                crate::output::print_json(&json!(list));
            } else {
                for (kid, alg, from, state, path) in rows {
                    let from = if from == 0 {
                        "start".to_owned()
                    } else {
                        time(from)
                    };
                    println!(
                        "{state:<9}  {alg:<5}  {kid}  from {from}  {}",
                        path.display()
                    );
                }
            }
        }
        KeysCommand::Prune { config } => {
            let (s, signer) = schedule(&config)?;
            let published = signer.published_kids();
            for f in key_files(&s.data_dir)? {
                let key = SigningKey::load(&f.path, f.alg)?;
                if !published.iter().any(|k| k == key.kid()) {
                    std::fs::remove_file(&f.path)
                        .with_context(|| format!("removing {}", f.path.display()))?;
                    println!("removed {} (kid {})", f.path.display(), key.kid());
                }
            }
        }
    }
    Ok(())
}
