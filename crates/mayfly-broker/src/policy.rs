//! The live policy set: Cedar policies from `[policy] dir`, reloaded on
//! SIGHUP and when the files change. A reload that fails validation keeps
//! the old set (and logs every problem); one that succeeds re-evaluates
//! every live credential, revoking what the new policies no longer allow.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use mayfly_core::{Decision, IssueTokenRequest, Policy, SignCertificateRequest, StartTaskRequest};
use mayfly_policy::{CedarPolicy, PolicyLoadError};
use tokio::sync::watch;

use crate::service::Service;

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

    /// Whether no policy is in force.
    pub fn is_empty(&self) -> bool {
        self.get().is_empty()
    }
}

impl Policy for PolicyHandle {
    fn decide_start_task(&self, req: &StartTaskRequest<'_>) -> Decision {
        self.get().decide_start_task(req)
    }
    fn decide_issue_token(&self, req: &IssueTokenRequest<'_>) -> Decision {
        self.get().decide_issue_token(req)
    }
    fn decide_sign_certificate(&self, req: &SignCertificateRequest<'_>) -> Decision {
        self.get().decide_sign_certificate(req)
    }
}

/// Names, sizes and modification times of the `.cedar` files: a change in
/// any of them means a reload.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "cedar"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.path(), m.len(), m.modified().ok()))
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
    mut stop: watch::Receiver<bool>,
) {
    let mut seen = fingerprint(&handle.dir);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let forced = tokio::select! {
            () = hangup => true,
            _ = tokio::time::sleep(interval) => false,
            () = crate::server::stopped(&mut stop) => return,
        };
        let now = fingerprint(&handle.dir);
        if !forced && now == seen {
            continue;
        }
        seen = now;
        match handle.reload() {
            Ok(n) => {
                tracing::info!(policies = n, dir = %handle.dir.display(), "policies reloaded");
                match service.reevaluate_all().await {
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
