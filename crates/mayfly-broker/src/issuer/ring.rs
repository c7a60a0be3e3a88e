//! The signing-key files and their schedule. A key directory (the broker's
//! `data_dir`, shared by replicas as a volume or Secret) holds:
//!
//! - `jwt-es256.key` / `jwt-eddsa.key`: a key that signs from the start
//!   (made on first start, or by `mayfly keygen`);
//! - `jwt-es256-<unix>.key` / `jwt-eddsa-<unix>.key`: a key that signs from
//!   that second on (made by `mayfly keys rotate`, ahead of its start so
//!   that validators have it in their JWKS cache before they meet it).
//!
//! The file names are the whole schedule: every replica reading them
//! switches keys at the same second, whenever it read them.
//! [`watch_and_reload`] follows the directory; [`JwtSigner`] applies the
//! schedule.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::JwtSigner;
use super::keys::{Algorithm, KeyError, SigningKey, key_path};
use crate::reload::{Look, Looks};
use crate::shutdown::Shutdown;

/// A key file of the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFile {
    /// Unix seconds from which it signs (0: from the start).
    pub from: u64,
    /// Where it is.
    pub path: PathBuf,
    /// Its algorithm.
    pub alg: Algorithm,
}

fn prefix(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::ES256 => "jwt-es256",
        Algorithm::EdDSA => "jwt-eddsa",
    }
}

/// The file a key of `alg` that signs from `from` (Unix seconds) goes to.
pub fn scheduled_path(dir: &Path, alg: Algorithm, from: u64) -> PathBuf {
    dir.join(format!("{}-{from}.key", prefix(alg)))
}

/// The key files in `dir`, by start time; other files are ignored.
pub fn key_files(dir: &Path) -> Result<Vec<KeyFile>, KeyError> {
    let entries = std::fs::read_dir(dir).map_err(|source| KeyError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        for alg in [Algorithm::ES256, Algorithm::EdDSA] {
            let Some(rest) = name
                .strip_prefix(prefix(alg))
                .and_then(|r| r.strip_suffix(".key"))
            else {
                continue;
            };
            let from = match rest.strip_prefix('-') {
                None if rest.is_empty() => Some(0),
                Some(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => t.parse().ok(),
                _ => None,
            };
            if let Some(from) = from {
                out.push(KeyFile {
                    from,
                    path: entry.path(),
                    alg,
                });
            }
        }
    }
    out.sort_by(|a, b| (a.from, &a.path).cmp(&(b.from, &b.path)));
    Ok(out)
}

/// Loads every key file in `dir`. With `create`, first makes the
/// from-the-start key of `alg` if the directory has no key of `alg` at all
/// (a first start).
pub fn load(dir: &Path, alg: Algorithm, create: bool) -> Result<Vec<(SigningKey, u64)>, KeyError> {
    if create && !key_files(dir)?.iter().any(|f| f.alg == alg) {
        SigningKey::load_or_create(dir, alg)?;
    }
    key_files(dir)?
        .into_iter()
        .map(|f| Ok((SigningKey::load(&f.path, f.alg)?, f.from)))
        .collect()
}

/// A signer over the key files of `dir`, making the first key if there is
/// none.
pub fn signer(dir: &Path, alg: Algorithm, retire_after: Duration) -> Result<JwtSigner, KeyError> {
    let keys = load(dir, alg, true)?;
    JwtSigner::from_ring(alg.name(), keys, retire_after).map_err(|reason| KeyError::Invalid {
        path: key_path(dir, alg),
        alg: alg.name(),
        reason,
    })
}

/// The names, sizes and modification times of the key files: what a
/// change looks like.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    key_files(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f.path).ok();
            let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
            (f.path, len, meta.and_then(|m| m.modified().ok()))
        })
        .collect()
}

/// Reloads the key files when they change (or on SIGHUP), until `stop`; a
/// set that does
/// not load (or has no key that signs now) is refused with a log line and
/// the keys in use kept.
pub(crate) async fn watch_and_reload(
    signer: Arc<JwtSigner>,
    dir: PathBuf,
    alg: Algorithm,
    interval: Duration,
    stop: Shutdown,
) {
    let mut seen = fingerprint(&dir);
    let mut looks = Looks::new(interval, stop);
    while let Some(look) = looks.next().await {
        let now = fingerprint(&dir);
        if look == Look::Due && now == seen {
            continue;
        }
        seen = now;
        let loaded = load(&dir, alg, false)
            .map_err(|e| e.to_string())
            .and_then(|keys| {
                let kids: Vec<String> = keys
                    .iter()
                    .map(|(k, from)| format!("{}@{from}", k.kid()))
                    .collect();
                signer.replace(keys).map(|()| kids)
            });
        match loaded {
            Ok(kids) => tracing::info!(keys = ?kids, "signing keys reloaded"),
            Err(e) => tracing::error!(
                error = %e,
                dir = %dir.display(),
                "signing key reload refused; the keys in use stay"
            ),
        }
    }
}
