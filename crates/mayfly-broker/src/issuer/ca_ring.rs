//! The issuing CA files and their schedule, as for signing keys. Next to
//! the files `[ca]` names (say `ca.pem` and `ca.key`, the CA that signs
//! from the start):
//!
//! - `ca-<unix>.pem` with `ca-<unix>.key` (in the key's directory): a CA
//!   that signs from that second on (written by `mayfly ca install`).
//!
//! The file names are the whole schedule: every replica reading them
//! switches CA at the same second, whenever it read them. Every CA of the
//! ring keeps its own CRL (`/crl/<id>`, named in each certificate it
//! signed), and the edge refuses every certificate any of them signed as a
//! caller. A superseded CA stays as long as its files: delete them once its
//! last certificate has expired (`certificates.max_ttl` after the switch).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mayfly_core::Timestamp;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::x509::{CaError, IssuingCa, ca_id};
use crate::fsutil::{write_new_private, write_public};
use crate::reload::{Look, Looks, file_hash};
use crate::shutdown::Shutdown;

/// `[ca]`: the issuing CA's certificate (optionally followed by
/// intermediates up to the root) and key: the CA that signs from the
/// start, beside which the schedule's files go.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaFiles {
    /// PEM certificate chain, issuing CA first.
    pub cert: PathBuf,
    /// PEM PKCS#8 key (mode 0600).
    pub key: PathBuf,
}

/// One CA of the schedule, as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFile {
    /// Unix seconds from which it signs (0: from the start).
    pub from: u64,
    /// Its certificate chain (PEM).
    pub cert: PathBuf,
    /// Its key (PEM, mode 0600).
    pub key: PathBuf,
}

/// `dir/stem-<from>.ext` for `path` = `dir/stem.ext`.
fn scheduled(path: &Path, from: u64) -> PathBuf {
    let stem = path.file_stem().and_then(OsStr::to_str).unwrap_or("ca");
    let name = match path.extension().and_then(OsStr::to_str) {
        Some(ext) => format!("{stem}-{from}.{ext}"),
        None => format!("{stem}-{from}"),
    };
    path.with_file_name(name)
}

/// Where the certificate and key of a CA that signs from `from` (Unix
/// seconds) go.
pub fn scheduled_paths(files: &CaFiles, from: u64) -> (PathBuf, PathBuf) {
    (scheduled(&files.cert, from), scheduled(&files.key, from))
}

/// The start time in a scheduled file name of `base`, if `name` is one.
fn from_of(base: &Path, name: &str) -> Option<u64> {
    let stem = base.file_stem()?.to_str()?;
    let rest = name.strip_prefix(stem)?.strip_prefix('-')?;
    let digits = match base.extension().and_then(OsStr::to_str) {
        Some(ext) => rest.strip_suffix(ext)?.strip_suffix('.')?,
        None => rest,
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The CA files of the schedule, by start time: the configured pair, then
/// each scheduled certificate with its key. A scheduled certificate without
/// its key is an error (a CA half installed); a key alone is ignored
/// (`mayfly ca install` writes the key first).
pub fn ca_files(files: &CaFiles) -> Result<Vec<CaFile>, CaError> {
    let dir = files
        .cert
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let entries = std::fs::read_dir(dir).map_err(|source| CaError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut out = vec![CaFile {
        from: 0,
        cert: files.cert.clone(),
        key: files.key.clone(),
    }];
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(from) = name.to_str().and_then(|n| from_of(&files.cert, n)) else {
            continue;
        };
        let (cert, key) = scheduled_paths(files, from);
        if !key.exists() {
            return Err(CaError::Invalid(format!(
                "{} has no key at {}",
                cert.display(),
                key.display()
            )));
        }
        out.push(CaFile { from, cert, key });
    }
    out.sort_by(|a, b| (a.from, &a.cert).cmp(&(b.from, &b.cert)));
    Ok(out)
}

/// Schedules the CA of `cert_pem` (its chain, issuing CA first) and
/// `key_pem` to sign from `from` (Unix seconds): checks it as the broker
/// would load it, refuses one already in the schedule, then writes the key
/// (0600) and last the certificate, renamed into place, so that a watcher
/// never takes half a CA. Returns the id and the two paths.
pub fn install(
    files: &CaFiles,
    cert_pem: &str,
    key_pem: &str,
    from: u64,
) -> Result<(String, PathBuf, PathBuf), CaError> {
    let ca = IssuingCa::from_pem(cert_pem, key_pem)?;
    for f in ca_files(files)? {
        let pem = std::fs::read(&f.cert).map_err(|source| CaError::Io {
            path: f.cert.display().to_string(),
            source,
        })?;
        let first = CertificateDer::pem_slice_iter(&pem)
            .next()
            .and_then(Result::ok);
        if first.is_some_and(|der| ca_id(&der) == ca.id()) {
            return Err(CaError::Invalid(format!(
                "CA {} is already scheduled in {}",
                ca.id(),
                f.cert.display()
            )));
        }
    }
    let (cert, key) = scheduled_paths(files, from);
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |source| CaError::Io { path, source }
    };
    write_new_private(&key, key_pem.as_bytes()).map_err(io(&key))?;
    let tmp = cert.with_file_name(format!(
        ".{}.tmp",
        cert.file_name().and_then(OsStr::to_str).unwrap_or("ca")
    ));
    write_public(&tmp, cert_pem.as_bytes())
        .and_then(|()| std::fs::rename(&tmp, &cert))
        .map_err(io(&cert))?;
    Ok((ca.id().to_owned(), cert, key))
}

/// A loaded CA of the schedule.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Unix seconds from which it signs.
    pub from: u64,
    /// The CA.
    pub ca: Arc<IssuingCa>,
    /// Its certificate file.
    pub cert: PathBuf,
}

/// Loads every CA of the schedule, each naming `<crl_base>/<its id>` as
/// the CRL of the certificates it signs.
pub fn load(files: &CaFiles, crl_base: &str) -> Result<Vec<Generation>, CaError> {
    ca_files(files)?
        .into_iter()
        .map(|f| {
            let ca = IssuingCa::load(&f.cert, &f.key)?;
            let url = format!("{crl_base}/{}", ca.id());
            Ok(Generation {
                from: f.from,
                ca: Arc::new(ca.with_crl_url(url)),
                cert: f.cert,
            })
        })
        .collect()
}

/// The issuing CAs by start time; the latest started signs.
pub struct CaRing {
    generations: RwLock<Arc<[Generation]>>,
}

impl std::fmt::Debug for CaRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.all().iter().map(|g| (g.from, g.ca.id().to_owned())))
            .finish()
    }
}

impl CaRing {
    /// A ring of `generations` (as [`load`] gives them); refused if none
    /// signs now.
    pub fn new(generations: Vec<Generation>) -> Result<Self, CaError> {
        let ring = Self {
            generations: RwLock::new(Vec::new().into()),
        };
        ring.replace(generations)?;
        Ok(ring)
    }

    /// Loads the schedule of `files` (see [`load`]).
    pub fn load(files: &CaFiles, crl_base: &str) -> Result<Self, CaError> {
        Self::new(load(files, crl_base)?)
    }

    /// Every CA, by start time.
    pub fn all(&self) -> Arc<[Generation]> {
        match self.generations.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The CA that signs at `now`.
    pub fn signing_at(&self, now: Timestamp) -> Arc<IssuingCa> {
        let all = self.all();
        // `replace` keeps only rings with a CA from 0 or earlier, and the
        // schedule is sorted.
        all.iter()
            .rev()
            .find(|g| g.from <= now.as_secs())
            .unwrap_or(&all[0])
            .ca
            .clone()
    }

    /// The CA that signs now.
    pub fn current(&self) -> Arc<IssuingCa> {
        self.signing_at(Timestamp::now())
    }

    /// The CA whose id is `id`.
    pub fn get(&self, id: &str) -> Option<Arc<IssuingCa>> {
        self.all()
            .iter()
            .find(|g| g.ca.id() == id)
            .map(|g| g.ca.clone())
    }

    /// Takes `generations` whole; refused, the ring unchanged, if empty or
    /// if none signs now.
    pub fn replace(&self, mut generations: Vec<Generation>) -> Result<(), CaError> {
        generations.sort_by_key(|g| g.from);
        let now = Timestamp::now().as_secs();
        if !generations.iter().any(|g| g.from <= now) {
            return Err(CaError::Invalid("no CA of the schedule signs now".into()));
        }
        let fresh: Arc<[Generation]> = generations.into();
        match self.generations.write() {
            Ok(mut g) => *g = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }
}

/// What a change of the CA files looks like: their names and contents.
fn fingerprint(files: &CaFiles) -> Vec<(PathBuf, Option<u64>)> {
    ca_files(files)
        .unwrap_or_default()
        .into_iter()
        .flat_map(|f| [f.cert, f.key])
        .map(|p| {
            let h = file_hash(&p);
            (p, h)
        })
        .collect()
}

/// Reloads the CA files when they change (or on SIGHUP), until `stop`; a
/// set that does not load (or has no CA that signs now) is refused with a
/// log line and the CAs in use kept.
pub(crate) async fn watch_and_reload(
    ring: Arc<CaRing>,
    files: CaFiles,
    crl_base: String,
    interval: Duration,
    stop: Shutdown,
) {
    let mut seen = fingerprint(&files);
    let mut looks = Looks::new(interval, stop);
    while let Some(look) = looks.next().await {
        let now = fingerprint(&files);
        if look == Look::Due && now == seen {
            continue;
        }
        seen = now;
        let loaded = load(&files, &crl_base).and_then(|gens| {
            let ids: Vec<String> = gens
                .iter()
                .map(|g| format!("{}@{}", g.ca.id(), g.from))
                .collect();
            ring.replace(gens).map(|()| ids)
        });
        match loaded {
            Ok(ids) => tracing::info!(cas = ?ids, "issuing CAs reloaded"),
            Err(e) => tracing::error!(
                error = %e,
                cert = %files.cert.display(),
                "issuing CA reload refused; the CAs in use stay"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduled_names_round_trip() {
        let files = CaFiles {
            cert: "/etc/mayfly/issuing-ca.pem".into(),
            key: "/secrets/issuing-ca.key".into(),
        };
        let (cert, key) = scheduled_paths(&files, 1_800_000_000);
        assert_eq!(cert, Path::new("/etc/mayfly/issuing-ca-1800000000.pem"));
        assert_eq!(key, Path::new("/secrets/issuing-ca-1800000000.key"));
        assert_eq!(
            from_of(&files.cert, "issuing-ca-1800000000.pem"),
            Some(1_800_000_000)
        );
        for other in [
            "issuing-ca.pem",
            "issuing-ca-.pem",
            "issuing-ca-12x.pem",
            "issuing-ca-12.key",
            "issuing-ca-12.pem.tmp",
            "other-12.pem",
        ] {
            assert_eq!(from_of(&files.cert, other), None, "{other}");
        }
    }
}
