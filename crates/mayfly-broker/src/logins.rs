//! The dropper: finishes the revocation of every database login.
//!
//! A login is held in the store ([`LoginQueue`]) before it is created, and
//! released only once its engine confirms it gone, so the work survives a
//! crash at any point and is shared by every replica. A login is dropped
//! when its lease is no longer active (revoked, expired, or never recorded
//! after [`UNRECORDED_GRACE`]): at once when the revocation feed names it,
//! and on every pass for expiries and for anything missed. Each drop is
//! two steps, [`Engine::disable`] (no new session, open ones ended) and
//! [`Engine::remove`], then a check that the login is gone; only then is
//! `database_login_dropped` recorded and the login released.
//!
//! A database that cannot be reached is retried with a backoff per
//! database (1 s doubling to [`MAX_BACKOFF`]), never per login, so a
//! database that is down costs one attempt per interval however many
//! logins wait for it. Failures are counted on `/metrics` and the first of
//! each run of failures is recorded (`database_login_drop_failed`). The
//! lease is never made active again: only its login is pending.
//!
//! The sweep ([`SWEEP_EVERY`]) lists each database's logins of its prefix
//! and drops the ones no held login accounts for (a login made by hand
//! with the prefix, or one whose hold was lost with a store), recording
//! each with reason `orphan`.
//!
//! [`LoginQueue`]: crate::store::LoginQueue

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_core::{Lease, LeaseId, LeaseKind, LeaseStatus, SpiffeId, Timestamp};
use mayfly_secrets::{Engine, EngineError};
use tokio::sync::broadcast::error::RecvError;

use crate::audit::{AuditRecord, Event};
use crate::feed::FeedHub;
use crate::metrics::Metrics;
use crate::recorder::Recorder;
use crate::shutdown::Shutdown;
use crate::store::{HeldLogin, LeaseStore};

/// How often held logins are looked at without a revocation naming them.
pub const PASS_EVERY: Duration = Duration::from_secs(2);
/// How often each database is swept for orphans.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How long a held login with no lease is left to the issue that holds it.
pub const UNRECORDED_GRACE: Duration = Duration::from_secs(60);
/// The longest wait before a database that failed is tried again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the dropper needs.
#[derive(Debug)]
pub struct Dropper {
    store: Arc<dyn LeaseStore>,
    engines: HashMap<String, Arc<dyn Engine>>,
    audit: Recorder,
    broker: SpiffeId,
    metrics: Arc<Metrics>,
    /// Per database: failures in a row, and when to try again.
    backoff: HashMap<String, (u32, Instant)>,
    /// Leases seen active, with their expiry: not looked at again before
    /// it unless the feed names them.
    active_until: HashMap<LeaseId, Timestamp>,
    /// The held logins as of the last pass, so that a revocation the feed
    /// names is dropped without reading every hold again (a mass
    /// revocation stays linear).
    held: HashMap<LeaseId, HeldLogin>,
}

/// Why a held login is dropped, for its record.
fn why(lease: Option<&Lease>, now: Timestamp) -> Option<&'static str> {
    match lease {
        None => Some("unrecorded"),
        Some(l) => match &l.status {
            LeaseStatus::Revoked(r) => Some(r.reason.as_str()),
            LeaseStatus::Expired => Some("expired"),
            LeaseStatus::Active if l.expires_at <= now => Some("expired"),
            LeaseStatus::Active => None,
        },
    }
}

impl Dropper {
    /// A dropper for `engines`.
    pub fn new(
        store: Arc<dyn LeaseStore>,
        engines: &[Arc<dyn Engine>],
        audit: Recorder,
        broker: SpiffeId,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            engines: engines
                .iter()
                .map(|e| (e.name().to_owned(), e.clone()))
                .collect(),
            audit,
            broker,
            metrics,
            backoff: HashMap::new(),
            active_until: HashMap::new(),
            held: HashMap::new(),
        }
    }

    /// Runs until `shutdown`: a pass at start and every [`PASS_EVERY`],
    /// a drop as soon as the feed names a login, a sweep every
    /// [`SWEEP_EVERY`].
    pub async fn run(mut self, feed: Arc<FeedHub>, mut shutdown: Shutdown) {
        if self.engines.is_empty() {
            return;
        }
        let mut events = feed.subscribe();
        let mut last_sweep = Instant::now();
        self.sweep().await;
        loop {
            self.pass(None).await;
            if last_sweep.elapsed() >= SWEEP_EVERY {
                self.active_until.clear();
                self.sweep().await;
                last_sweep = Instant::now();
            }
            let deadline = tokio::time::sleep(PASS_EVERY);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = &mut deadline => break,
                    () = shutdown.wait() => return,
                    event = events.recv() => match event {
                        Ok(e) if e.kind == Some(LeaseKind::DatabaseLogin) => {
                            self.active_until.remove(&e.lease_id);
                            match self.held.get(&e.lease_id).cloned() {
                                Some(login) => {
                                    let _ = self.consider(&login, Timestamp::now()).await;
                                }
                                // Held since the last pass (on another
                                // replica, or just now): read them again.
                                None => self.pass(Some(&e.lease_id)).await,
                            }
                        }
                        Ok(_) => {}
                        Err(RecvError::Lagged(_)) => {
                            self.active_until.clear();
                            break;
                        }
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        }
    }

    /// Looks at every held login (or only `only`'s), dropping those whose
    /// lease ended.
    pub async fn pass(&mut self, only: Option<&LeaseId>) {
        let held = match self.store.held_logins().await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "database logins: cannot read the held logins");
                return;
            }
        };
        self.metrics
            .logins_held
            .set(i64::try_from(held.len()).unwrap_or(i64::MAX));
        let now = Timestamp::now();
        let held_ids: HashSet<&LeaseId> = held.iter().map(|h| &h.lease_id).collect();
        self.active_until.retain(|id, _| held_ids.contains(id));
        self.held = held
            .iter()
            .map(|h| (h.lease_id.clone(), h.clone()))
            .collect();
        for login in &held {
            if only.is_some_and(|id| id != &login.lease_id) {
                continue;
            }
            if !self.consider(login, now).await {
                return;
            }
        }
    }

    /// Drops `login` if its lease ended; `false` if the store could not be
    /// read (the pass stops there).
    async fn consider(&mut self, login: &HeldLogin, now: Timestamp) -> bool {
        if self
            .active_until
            .get(&login.lease_id)
            .is_some_and(|&until| until > now)
        {
            return true;
        }
        if !self.ready(&login.database) {
            return true;
        }
        let lease = match self.store.get_lease(&login.lease_id).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "database logins: cannot read a lease");
                return false;
            }
        };
        let reason = match why(lease.as_ref(), now) {
            Some("unrecorded") if login.held_at.plus(UNRECORDED_GRACE) > now => return true,
            Some(reason) => reason,
            None => {
                if let Some(l) = &lease {
                    self.active_until
                        .insert(login.lease_id.clone(), l.expires_at);
                }
                return true;
            }
        };
        self.drop_login(login, lease.as_ref(), reason).await;
        true
    }

    /// Whether `database` may be tried now.
    fn ready(&self, database: &str) -> bool {
        self.backoff
            .get(database)
            .is_none_or(|(_, at)| *at <= Instant::now())
    }

    /// Disables, removes and confirms gone; then records and releases.
    async fn drop_login(&mut self, login: &HeldLogin, lease: Option<&Lease>, reason: &str) {
        let Some(engine) = self.engines.get(&login.database).cloned() else {
            tracing::warn!(
                database = %login.database,
                user = %login.user,
                "database logins: a held login's database is no longer configured; kept"
            );
            return;
        };
        let outcome = async {
            engine.disable(&login.user).await?;
            crate::failpoint::hit("after_login_disabled");
            engine.remove(&login.user).await?;
            if engine.exists(&login.user).await? {
                return Err(EngineError::Refused {
                    database: login.database.clone(),
                    step: "confirm",
                    detail: "the login still exists after it was dropped".into(),
                });
            }
            Ok(())
        }
        .await;
        let mut record = AuditRecord::new(Event::DatabaseLoginDropped, &self.broker)
            .lease(&login.lease_id)
            .reason(reason);
        record.audience = Some(login.database.clone());
        record.login = Some(login.user.clone());
        if let Some(l) = lease {
            record = record.task_id(&l.task_id);
            record.agent = Some(l.agent.to_string());
        }
        match outcome {
            Ok(()) => {
                self.backoff.remove(&login.database);
                if let Err(e) = self.audit.record(record).await {
                    // Kept held: dropped again (a no-op) and recorded then.
                    tracing::error!(error = %e, "database login drop not recorded; retried");
                    return;
                }
                self.active_until.remove(&login.lease_id);
                self.held.remove(&login.lease_id);
                if let Err(e) = self.store.release_login(&login.lease_id).await {
                    tracing::warn!(error = %e, "database logins: release failed; retried");
                }
            }
            Err(e) => self.failed(login, record, &e).await,
        }
    }

    /// Counts a failure, backs the database off, and records the first of
    /// a run of failures.
    async fn failed(&mut self, login: &HeldLogin, mut record: AuditRecord, e: &EngineError) {
        self.metrics.login_drop_failures.inc();
        let (failures, _) = self
            .backoff
            .get(&login.database)
            .copied()
            .unwrap_or((0, Instant::now()));
        let wait = Duration::from_secs(1u64 << failures.min(5)).min(MAX_BACKOFF);
        self.backoff.insert(
            login.database.clone(),
            (failures + 1, Instant::now() + wait),
        );
        tracing::warn!(
            database = %login.database,
            user = %login.user,
            error = %e,
            retry_in_s = wait.as_secs(),
            "database login not dropped yet"
        );
        if failures == 0 {
            record.event = Event::DatabaseLoginDropFailed;
            record.reason = Some(e.to_string());
            if let Err(e) = self.audit.record(record).await {
                tracing::error!(error = %e, "drop failure not recorded in the audit trail");
            }
        }
    }

    /// Drops every login of each database's prefix that no held login
    /// accounts for.
    pub async fn sweep(&mut self) {
        let engines: Vec<Arc<dyn Engine>> = self.engines.values().cloned().collect();
        for engine in engines {
            if !self.ready(engine.name()) {
                continue;
            }
            // The logins first, then the holds: a login made after the
            // holds were read was held before it was made.
            let existing = match engine.existing().await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(database = engine.name(), error = %e, "sweep: cannot list logins");
                    continue;
                }
            };
            let held = match self.store.held_logins().await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "sweep: cannot read the held logins");
                    return;
                }
            };
            let known: HashSet<&str> = held
                .iter()
                .filter(|h| h.database == engine.name())
                .map(|h| h.user.as_str())
                .collect();
            for user in existing.iter().filter(|u| !known.contains(u.as_str())) {
                let result = engine.revoke(user).await;
                let mut record =
                    AuditRecord::new(Event::DatabaseLoginDropped, &self.broker).reason("orphan");
                record.audience = Some(engine.name().to_owned());
                record.login = Some(user.clone());
                match result {
                    Ok(()) => {
                        tracing::info!(database = engine.name(), user = %user, "orphan login dropped");
                        if let Err(e) = self.audit.record(record).await {
                            tracing::error!(error = %e, "orphan drop not recorded in the audit trail");
                        }
                    }
                    Err(e) => {
                        self.metrics.login_drop_failures.inc();
                        tracing::warn!(database = engine.name(), user = %user, error = %e, "sweep: orphan not dropped");
                        break;
                    }
                }
            }
        }
    }
}
