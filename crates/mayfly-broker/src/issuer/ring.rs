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
//! switches keys at the same second, whenever it read them. With
//! `tokens.rotate_every`, the brokers write the next key themselves.
//! [`watch_and_reload`] follows the directory; [`JwtSigner`] applies the
//! schedule.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::JwtSigner;
use super::keys::{Algorithm, KeyError, SigningKey, key_path};
use crate::reload::{Look, Looks};
use crate::shutdown::Shutdown;

/// The broker's own signing-key rotation (`tokens.rotate_every` and
/// `rotate_lead`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRotation {
    /// How long each key signs.
    pub every: Duration,
    /// How long the next key is published before it signs.
    pub lead: Duration,
}

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
    JwtSigner::from_ring(alg.name(), keys, retire_after).map_err(|e| KeyError::Invalid {
        path: key_path(dir, alg),
        alg: alg.name(),
        source: Box::new(e),
    })
}

/// With `tokens.rotate_every`: writes the next key if none is scheduled
/// and the current one has signed for `every` less `lead` (it signs
/// `lead` after it is written), then deletes the files of keys `signer`
/// no longer publishes. Every replica runs it; the file names decide, so
/// when two race, one write fails with `AlreadyExists` and the other's key
/// is the one all follow. Returns what changed, for the log.
pub(crate) fn rotate_if_due(
    dir: &Path,
    alg: Algorithm,
    rotation: KeyRotation,
    signer: &JwtSigner,
    now: u64,
) -> Result<Vec<String>, KeyError> {
    let mut done = Vec::new();
    let files: Vec<KeyFile> = key_files(dir)?
        .into_iter()
        .filter(|f| f.alg == alg)
        .collect();
    if let Some(latest) = files.last()
        && latest.from <= now
    {
        // Since when the latest key signs: its scheduled second, or for the
        // from-the-start key the time its file was made.
        let since = match latest.from {
            0 => std::fs::metadata(&latest.path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(now, |d| d.as_secs()),
            from => from,
        };
        let due = since + rotation.every.as_secs();
        if due <= now + rotation.lead.as_secs() {
            let from = due.max(now + rotation.lead.as_secs());
            let path = scheduled_path(dir, alg, from);
            match SigningKey::generate_file(&path, alg) {
                Ok(()) => done.push(format!("wrote {}", path.display())),
                Err(KeyError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
    }
    let published = signer.published_kids();
    for f in files.iter().filter(|f| f.from <= now) {
        let key = SigningKey::load(&f.path, f.alg)?;
        if !published.iter().any(|k| k == key.kid()) {
            match std::fs::remove_file(&f.path) {
                Ok(()) => done.push(format!("removed {} (kid {})", f.path.display(), key.kid())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(KeyError::Io {
                        path: f.path.clone(),
                        source,
                    });
                }
            }
        }
    }
    Ok(done)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
/// set that does not load (or has no key that signs now) is refused with
/// a log line and the keys in use kept. With `rotation`, first writes the
/// next key when due and deletes retired ones ([`rotate_if_due`]).
pub(crate) async fn watch_and_reload(
    signer: Arc<JwtSigner>,
    dir: PathBuf,
    alg: Algorithm,
    interval: Duration,
    rotation: Option<KeyRotation>,
    stop: Shutdown,
) {
    let mut seen = fingerprint(&dir);
    let mut looks = Looks::new(interval, stop);
    while let Some(look) = looks.next().await {
        if let Some(rotation) = rotation {
            match rotate_if_due(&dir, alg, rotation, &signer, unix_now()) {
                Ok(done) => {
                    for what in done {
                        tracing::info!(%what, "signing key rotation");
                    }
                }
                Err(e) => tracing::error!(error = %e, "scheduled signing key rotation failed"),
            }
        }
        let now = fingerprint(&dir);
        if look == Look::Due && now == seen {
            continue;
        }
        seen = now;
        let loaded = load(&dir, alg, false)
            .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
            .and_then(|keys| {
                let kids: Vec<String> = keys
                    .iter()
                    .map(|(k, from)| format!("{}@{from}", k.kid()))
                    .collect();
                signer.replace(keys).map(|()| kids).map_err(Into::into)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_next_key_is_written_lead_before_it_signs_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let first = key_path(dir, Algorithm::ES256);
        SigningKey::generate_file(&first, Algorithm::ES256).unwrap();
        let now = unix_now();
        // The first key has signed for 95 s of its 100.
        let made = std::time::UNIX_EPOCH + Duration::from_secs(now - 95);
        std::fs::File::options()
            .write(true)
            .open(&first)
            .unwrap()
            .set_modified(made)
            .unwrap();
        let signer = signer(dir, Algorithm::ES256, Duration::from_secs(10)).unwrap();
        let slow = KeyRotation {
            every: Duration::from_secs(1000),
            lead: Duration::from_secs(20),
        };
        assert!(
            rotate_if_due(dir, Algorithm::ES256, slow, &signer, now)
                .unwrap()
                .is_empty()
        );
        assert_eq!(names(dir), ["jwt-es256.key"]);

        let due = KeyRotation {
            every: Duration::from_secs(100),
            lead: Duration::from_secs(20),
        };
        let done = rotate_if_due(dir, Algorithm::ES256, due, &signer, now).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        // Due at +5 s, but published `lead` first.
        let next = format!("jwt-es256-{}.key", now + 20);
        assert_eq!(names(dir), [next.clone(), "jwt-es256.key".to_owned()]);
        // Scheduled already: a second look (or another replica) writes
        // nothing, and the current key stays.
        assert!(
            rotate_if_due(dir, Algorithm::ES256, due, &signer, now)
                .unwrap()
                .is_empty()
        );
        assert_eq!(names(dir).len(), 2);
        // The name decides: a replica racing for it fails to create it.
        let e = SigningKey::generate_file(&dir.join(&next), Algorithm::ES256).unwrap_err();
        assert!(
            matches!(e, KeyError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists)
        );
        assert_eq!(names(dir).len(), 2, "no temporary file is left behind");
    }

    /// A key that is not one, and a ring with no key signing now, are
    /// refused saying so, with what refused them as the source.
    #[test]
    fn refusals_keep_what_was_wrong() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = key_path(dir, Algorithm::ES256);
        SigningKey::generate_file(&key_path(dir, Algorithm::EdDSA), Algorithm::EdDSA).unwrap();
        std::fs::rename(key_path(dir, Algorithm::EdDSA), &path).unwrap();
        let e = SigningKey::load(&path, Algorithm::ES256).unwrap_err();
        let start = format!("{}: not a valid ES256 PKCS#8 key: ", path.display());
        assert!(e.to_string().starts_with(&start), "{e}");
        let source = std::error::Error::source(&e);
        assert!(
            source.is_some_and(|s| s.is::<crate::issuer::Pkcs8Error>()),
            "{e:?}"
        );

        let e = JwtSigner::from_ring("ES256", Vec::new(), Duration::ZERO).unwrap_err();
        assert_eq!(e.to_string(), "no ES256 key signs now");
        assert_eq!(e.alg, "ES256");
    }

    #[test]
    fn keys_no_longer_published_are_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let now = unix_now();
        for from in [0, now - 1000, now - 500] {
            let path = match from {
                0 => key_path(dir, Algorithm::ES256),
                f => scheduled_path(dir, Algorithm::ES256, f),
            };
            SigningKey::generate_file(&path, Algorithm::ES256).unwrap();
        }
        let signer = signer(dir, Algorithm::ES256, Duration::from_secs(10)).unwrap();
        let rotation = KeyRotation {
            every: Duration::from_secs(100_000),
            lead: Duration::from_secs(600),
        };
        let done = rotate_if_due(dir, Algorithm::ES256, rotation, &signer, now).unwrap();
        assert_eq!(done.len(), 2, "{done:?}");
        assert_eq!(names(dir), [format!("jwt-es256-{}.key", now - 500)]);
        assert_eq!(signer.published_kids().len(), 1);
    }
}
