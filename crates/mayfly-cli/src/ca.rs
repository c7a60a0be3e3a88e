//! `mayfly ca`: the issuing-CA schedule next to the `[ca]` files, which
//! every replica follows (`mayfly_broker::issuer::CaRing`, with
//! `install_ca` and `ca_files`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use mayfly_broker::Config;
use mayfly_broker::config::Settings;
use mayfly_broker::issuer::CaFiles;
use mayfly_broker::issuer::{install_ca as install, load_cas as load};
use serde_json::json;
use zeroize::Zeroizing;

use crate::keys::{now, time};

/// `mayfly ca …`.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Schedule the next issuing CA (a CA certificate, chained to the same
    /// root as the current one, and its key): every replica loads it within
    /// `tls.reload_interval` and refuses anything it signs as a caller at
    /// once; it signs task certificates from `--in` later, each naming its
    /// own CRL (`/crl/<id>`). The current CA keeps its CRL.
    Install {
        /// Path to mayfly.toml.
        #[arg(long, env = "MAYFLY_CONFIG")]
        config: PathBuf,
        /// The new CA's certificate (PEM, issuing CA first, then any
        /// intermediates).
        #[arg(long)]
        cert: PathBuf,
        /// Its private key (PEM PKCS#8, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// When it starts signing; longer than `tls.reload_interval`, so
        /// every replica has it first.
        #[arg(long = "in", default_value = "1m", value_parser = humantime::parse_duration)]
        lead: Duration,
    },
    /// The CAs of the schedule: which signs now, which is next, and which
    /// no live certificate needs any more.
    List {
        /// Path to mayfly.toml.
        #[arg(long, env = "MAYFLY_CONFIG")]
        config: PathBuf,
    },
}

fn settings(config: &Path) -> anyhow::Result<(Settings, CaFiles)> {
    let s = Config::load(config)?.settings()?;
    let files = s.ca.clone().with_context(|| {
        format!(
            "{} has no [ca]: this broker signs no certificates",
            config.display()
        )
    })?;
    Ok((s, files))
}

/// Runs a `ca` command.
pub fn run(cmd: CaCommand, as_json: bool) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Install {
            config,
            cert,
            key,
            lead,
        } => {
            let (s, files) = settings(&config)?;
            if lead <= s.tls.reload_interval {
                anyhow::bail!(
                    "--in {} is not longer than tls.reload_interval ({}): a replica could sign \
                     with the old CA after the switch",
                    humantime::format_duration(lead),
                    humantime::format_duration(s.tls.reload_interval)
                );
            }
            // As the broker will load it: key mode 0600, a CA that can sign
            // certificates and CRLs.
            mayfly_broker::issuer::IssuingCa::load(&cert, &key)?;
            let cert_pem = std::fs::read_to_string(&cert)
                .with_context(|| format!("reading {}", cert.display()))?;
            let key_pem = Zeroizing::new(
                std::fs::read_to_string(&key)
                    .with_context(|| format!("reading {}", key.display()))?,
            );
            let current = load(&files, "")?;
            let from = now() + lead.as_secs();
            let (id, cert_path, key_path) = install(&files, &cert_pem, &key_pem, from)?;
            let signing = current
                .iter()
                .rev()
                .find(|g| g.from <= now())
                .map(|g| g.ca.id().to_owned())
                .unwrap_or_default();
            let until = from + s.lifetimes.cert_max_ttl.as_secs();
            if as_json {
                crate::output::print_json(&json!({
                    "id": id, "cert": cert_path, "key": key_path,
                    "signs_from": time(from), "replaces": signing,
                    "replaced_certificates_live_until": time(until),
                }));
            } else {
                println!(
                    "wrote {} and {} (CA {id})",
                    cert_path.display(),
                    key_path.display()
                );
                println!("refused as a caller's CA now; signs from {}", time(from));
                println!(
                    "CA {signing} signs until then; its last certificate expires by {} \
                     (keep its files until then: they serve its CRL)",
                    time(until)
                );
            }
        }
        CaCommand::List { config } => {
            let (s, files) = settings(&config)?;
            let gens = load(&files, "")?;
            let now = now();
            let signing = gens.iter().rposition(|g| g.from <= now);
            let mut rows = Vec::new();
            for (i, g) in gens.iter().enumerate() {
                let successor = gens.get(i + 1).map(|n| n.from);
                let state = match (Some(i) == signing, successor) {
                    (true, _) => "signing",
                    _ if g.from > now => "next",
                    (false, Some(next)) if next + s.lifetimes.cert_max_ttl.as_secs() <= now => {
                        "retired"
                    }
                    _ => "superseded",
                };
                rows.push((g.ca.id().to_owned(), g.from, state, g.cert.clone()));
            }
            if as_json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|(id, from, state, path)| {
                        json!({"id": id, "signs_from": (*from > 0).then(|| time(*from)),
                               "state": state, "cert": path})
                    })
                    .collect();
                crate::output::print_json(&json!(list));
            } else {
                for (id, from, state, path) in rows {
                    let from = if from == 0 {
                        "start".to_owned()
                    } else {
                        time(from)
                    };
                    println!("{state:<10}  {id}  from {from}  {}", path.display());
                }
            }
        }
    }
    Ok(())
}
