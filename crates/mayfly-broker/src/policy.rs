//! The live policy set: Cedar policies from `[policy] dir`, reloaded on
//! SIGHUP and when the files change. A reload that fails validation keeps
//! the old set (and logs every problem); one that succeeds re-evaluates
//! every live credential, revoking what the new policies no longer allow.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mayfly_core::{Decision, Policy, PolicyRequest};
use mayfly_policy::{CedarPolicy, PolicyLoadError};

use crate::reload::{Look, Looks, file_hash};
use crate::service::Service;
use crate::shutdown::Shutdown;

/// The current policy set, swapped whole on reload.
#[derive(Debug)]
pub struct PolicyHandle {
    dir: PathBuf,
    current: RwLock<Arc<CedarPolicy>>,
}

impl PolicyHandle {
    /// Loads the policies in `dir`; fails (listing every problem) if any is
    /// invalid.
    pub fn load(dir: &Path) -> Result<Self, PolicyLoadError> {
        let set = CedarPolicy::load_dir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            current: RwLock::new(Arc::new(set)),
        })
    }

    fn get(&self) -> Arc<CedarPolicy> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Loads the directory again; on success the new set replaces the old.
    pub fn reload(&self) -> Result<usize, PolicyLoadError> {
        let set = CedarPolicy::load_dir(&self.dir)?;
        let n = set.len();
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(set),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(set),
        }
        Ok(n)
    }

    /// How many policies are in force.
    pub fn len(&self) -> usize {
        self.get().len()
    }
}

impl Policy for PolicyHandle {
    fn decide(&self, req: &PolicyRequest<'_>) -> Decision {
        self.get().decide(req)
    }
}

/// Names and contents (hashed) of the policy files (`*.cedar`,
/// `tools.toml`): a change in any of
/// them means a reload. Contents are read through symlinks, because a
/// Kubernetes ConfigMap volume updates its files by swapping a symlinked
/// directory, which leaves each file's own link and times unchanged.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, Option<u64>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| mayfly_policy::is_policy_file(p))
        .map(|p| {
            let hash = file_hash(&p);
            (p, hash)
        })
        .collect();
    out.sort();
    out
}

/// Reloads on SIGHUP or file changes until `stop`.
pub async fn watch_and_reload(
    handle: Arc<PolicyHandle>,
    service: Arc<Service>,
    interval: Duration,
    stop: Shutdown,
) {
    let mut seen = fingerprint(&handle.dir);
    let mut looks = Looks::new(interval, stop);
    while let Some(look) = looks.next().await {
        let now = fingerprint(&handle.dir);
        if look == Look::Due && now == seen {
            continue;
        }
        seen = now;
        match handle.reload() {
            Ok(n) => {
                tracing::info!(policies = n, dir = %handle.dir.display(), "policies reloaded");
                match service.tasks().reevaluate_all().await {
                    Ok(revoked) if !revoked.is_empty() => tracing::info!(
                        revoked = revoked.len(),
                        "credentials the new policies no longer allow were revoked"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "re-evaluation after the reload failed"),
                }
            }
            Err(e) => {
                for p in &e.problems {
                    tracing::error!(problem = %p, "invalid policy");
                }
                tracing::error!(
                    problems = e.problems.len(),
                    "policy reload refused; the previous policies stay in force"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// A ConfigMap volume: `mayfly.cedar -> ..data/mayfly.cedar`, with
    /// `..data -> ..v1` swapped to `..v2` on update.
    #[test]
    fn a_configmap_style_symlink_swap_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (v, text) in [("..v1", "one"), ("..v2", "two")] {
            std::fs::create_dir(d.join(v)).unwrap();
            std::fs::write(d.join(v).join("mayfly.cedar"), text).unwrap();
        }
        symlink("..v1", d.join("..data")).unwrap();
        symlink("..data/mayfly.cedar", d.join("mayfly.cedar")).unwrap();
        let before = fingerprint(d);
        assert_eq!(before.len(), 1);
        assert_eq!(fingerprint(d), before, "nothing changed");

        symlink("..v2", d.join("..data.tmp")).unwrap();
        std::fs::rename(d.join("..data.tmp"), d.join("..data")).unwrap();
        assert_ne!(fingerprint(d), before);
    }
}
