//! The dropper: finishes the revocation of every database login.
//!
//! A login is held in the store ([`LoginQueue`]) before it is created, and
//! released only once its engine confirms it gone, so the work survives a
//! crash at any point and is shared by every replica. A login is dropped
//! when its lease is no longer active (revoked, expired, or never recorded
//! after [`UNRECORDED_GRACE`]): at once when the revocation feed names it,
//! and on every pass for expiries and for anything missed.
//!
//! The logins due are taken per database, [`BATCH`] at a time, in two
//! stages. The dropper itself disables each batch at once
//! ([`Engine::disable`]: no new session for any, open ones told to end),
//! so a revocation is never kept waiting behind another's removal. The
//! removal runs in a task of its own, one batch per database at a time:
//! it waits until the batch's sessions have [`Engine::ended`], removes
//! each login ([`Engine::remove`], a few at once) and checks it is gone,
//! then reports back; only then is each `database_login_dropped` recorded
//! and the login released. A mass revocation thus shuts every login
//! within the disables, and the feed's burst of events is taken together.
//!
//! Every replica runs a dropper over the same holds. Before it disables a
//! login, and again before it removes it, a replica claims that step in
//! the store for [`CLAIM_FOR`] ([`ReplayGuard::first_use`]) and checks the
//! login is still held, so each login is removed and recorded once; a
//! replica that dies holding a claim leaves the login to the others (or to
//! itself, restarted) when it lapses. A replica stalled past its claim in
//! the middle of a removal may see another remove the same login beside
//! it: every step is idempotent, and the only cost is a second record.
//!
//! A database that cannot be reached is retried with a backoff per
//! database (1 s doubling to [`MAX_BACKOFF`]), so a database that is down
//! costs one attempt per interval however many logins wait for it. A
//! login the database refuses to end (one made a superuser by hand, one
//! that owns objects elsewhere) backs off alone, so it never holds up the
//! other revocations of its database. Failures are counted on `/metrics`
//! and the first of each run of failures (per database, or per login) is
//! recorded (`database_login_drop_failed`). The lease is never made active
//! again: only its login is pending.
//!
//! The sweep ([`SWEEP_EVERY`]) lists each database's logins of its prefix
//! and drops the ones no held login accounts for (a login made by hand
//! with the prefix, or one whose hold was lost with a store), recording
//! each with reason `orphan`.
//!
//! [`LoginQueue`]: crate::store::LoginQueue
//! [`ReplayGuard::first_use`]: crate::store::ReplayGuard::first_use

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mayfly_core::{Lease, LeaseId, LeaseKind, LeaseStatus, SpiffeId, Timestamp};
use mayfly_secrets::{Engine, EngineError};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{Semaphore, mpsc};

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

/// How long a replica's claim on a login's drop keeps the other replicas
/// off it (so that each drop is done, and recorded, once). Far longer
/// than a batch takes; short, because a replica that dies holding claims
/// (a broker restarted after a crash) delays those drops by as much.
pub const CLAIM_FOR: Duration = Duration::from_secs(10);
/// How many logins of one database are disabled together.
pub const BATCH: usize = 128;
/// How many logins of one database are removed at once.
const REMOVALS_IN_FLIGHT: usize = 4;

/// What the dropper needs.
#[derive(Debug)]
pub struct Dropper {
    store: Arc<dyn LeaseStore>,
    engines: HashMap<String, Arc<dyn Engine>>,
    audit: Recorder,
    broker: SpiffeId,
    metrics: Arc<Metrics>,
    /// Per database that could not be reached: failures in a row, and
    /// when to try again.
    backoff: HashMap<String, (u32, Instant)>,
    /// The same per login the database refused to end.
    refused: HashMap<LeaseId, (u32, Instant)>,
    /// Leases seen active, with their expiry: not looked at again before
    /// it unless the feed names them.
    active_until: HashMap<LeaseId, Timestamp>,
    /// The held logins as of the last pass, so that a revocation the feed
    /// names is dropped without reading every hold again (a mass
    /// revocation stays linear).
    held: HashMap<LeaseId, HeldLogin>,
    /// The drops this replica has claimed, until when.
    claims: HashMap<LeaseId, Timestamp>,
    /// Logins disabled here whose removal is under way.
    removing: HashSet<LeaseId>,
    /// Per database: one batch removed at a time.
    removals: HashMap<String, Arc<Semaphore>>,
    /// Where removals report, and where the dropper reads them.
    removed_tx: mpsc::UnboundedSender<Vec<Removed>>,
    removed_rx: mpsc::UnboundedReceiver<Vec<Removed>>,
}

/// A held login whose lease ended: to drop.
#[derive(Debug)]
struct Due {
    login: HeldLogin,
    lease: Option<Lease>,
    reason: String,
}

/// What became of a disabled login's removal.
#[derive(Debug)]
enum Removal {
    /// Gone, confirmed.
    Done,
    /// Another replica claimed its removal (or released it): not ours.
    Skipped,
    Failed(EngineError),
}

type Removed = (Due, Removal);

/// What woke the dropper.
enum Wake {
    Pass,
    Stop,
    Event(Result<Arc<crate::store::RevocationEvent>, RecvError>),
    Removed(Vec<Removed>),
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
        let (removed_tx, removed_rx) = mpsc::unbounded_channel();
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
            refused: HashMap::new(),
            active_until: HashMap::new(),
            held: HashMap::new(),
            claims: HashMap::new(),
            removing: HashSet::new(),
            removals: HashMap::new(),
            removed_tx,
            removed_rx,
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
                let wake = tokio::select! {
                    () = &mut deadline => Wake::Pass,
                    () = shutdown.wait() => Wake::Stop,
                    event = events.recv() => Wake::Event(event),
                    Some(done) = self.removed_rx.recv() => Wake::Removed(done),
                };
                let first = match wake {
                    Wake::Pass => break,
                    Wake::Stop => return,
                    Wake::Removed(done) => {
                        self.finish(done).await;
                        continue;
                    }
                    Wake::Event(event) => event,
                };
                let mut named = HashSet::new();
                let mut lagged = false;
                // The first event came from a waiting receive, the rest
                // from `try_recv`: one error type for both.
                let mut next = first.map_err(|e| match e {
                    RecvError::Lagged(_) => TryRecvError::Lagged(0),
                    RecvError::Closed => TryRecvError::Closed,
                });
                // A mass revocation arrives as a burst: what is already
                // there is dropped together.
                loop {
                    match next {
                        Ok(e) if e.kind == Some(LeaseKind::DatabaseLogin) => {
                            self.active_until.remove(&e.lease_id);
                            named.insert(e.lease_id.clone());
                        }
                        Ok(_) => {}
                        Err(TryRecvError::Lagged(_)) => lagged = true,
                        Err(TryRecvError::Closed) => return,
                        Err(TryRecvError::Empty) => break,
                    }
                    if named.len() >= BATCH * 8 {
                        break;
                    }
                    next = events.try_recv();
                }
                self.named(&named).await;
                if lagged {
                    // Events were missed: look at every held login.
                    self.active_until.clear();
                    break;
                }
            }
        }
    }

    /// Drops the held logins the feed named whose lease ended.
    async fn named(&mut self, named: &HashSet<LeaseId>) {
        if named.is_empty() {
            return;
        }
        let now = Timestamp::now();
        let mut due = Vec::new();
        let mut unknown = HashSet::new();
        for id in named {
            match self.held.get(id).cloned() {
                Some(login) => match self.due(login, now).await {
                    Ok(Some(d)) => due.push(d),
                    Ok(None) => {}
                    Err(()) => return,
                },
                None => {
                    unknown.insert(id.clone());
                }
            }
        }
        self.drop_all(due).await;
        if !unknown.is_empty() {
            // Held since the last pass (on another replica, or just now):
            // read the holds again.
            self.pass(Some(&unknown)).await;
        }
    }

    /// Looks at every held login (or only those in `only`), dropping those
    /// whose lease ended.
    pub async fn pass(&mut self, only: Option<&HashSet<LeaseId>>) {
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
        self.claims.retain(|_, until| *until > now);
        let mut due = Vec::new();
        for login in held {
            if only.is_some_and(|ids| !ids.contains(&login.lease_id)) {
                continue;
            }
            match self.due(login, now).await {
                Ok(Some(d)) => due.push(d),
                Ok(None) => {}
                // The store could not be read: the pass stops there.
                Err(()) => break,
            }
        }
        self.drop_all(due).await;
    }

    /// `login` if its lease ended; `Err` if the store could not be read.
    async fn due(&mut self, login: HeldLogin, now: Timestamp) -> Result<Option<Due>, ()> {
        if self
            .active_until
            .get(&login.lease_id)
            .is_some_and(|&until| until > now)
            || self.removing.contains(&login.lease_id)
            || !self.ready(&login.database)
            || !ready_at(self.refused.get(&login.lease_id))
        {
            return Ok(None);
        }
        let lease = match self.store.get_lease(&login.lease_id).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "database logins: cannot read a lease");
                return Err(());
            }
        };
        let reason = match why(lease.as_ref(), now) {
            Some("unrecorded") if login.held_at.plus(UNRECORDED_GRACE) > now => return Ok(None),
            Some(reason) => reason.to_owned(),
            None => {
                if let Some(l) = &lease {
                    self.active_until
                        .insert(login.lease_id.clone(), l.expires_at);
                }
                return Ok(None);
            }
        };
        Ok(Some(Due {
            login,
            lease,
            reason,
        }))
    }

    /// Whether `database` may be tried now.
    fn ready(&self, database: &str) -> bool {
        ready_at(self.backoff.get(database))
    }

    /// Drops `due`, per database [`BATCH`] at a time, until a database
    /// fails.
    async fn drop_all(&mut self, due: Vec<Due>) {
        let mut by_database: HashMap<String, Vec<Due>> = HashMap::new();
        for d in due {
            by_database
                .entry(d.login.database.clone())
                .or_default()
                .push(d);
        }
        for (database, mut due) in by_database {
            let Some(engine) = self.engines.get(&database).cloned() else {
                tracing::warn!(
                    %database,
                    held = due.len(),
                    "database logins: held logins' database is no longer configured; kept"
                );
                continue;
            };
            while !due.is_empty() && self.ready(&database) {
                let rest = due.split_off(due.len().min(BATCH));
                let batch = self.claimed(due).await;
                if !batch.is_empty() {
                    self.drop_batch(&engine, batch).await;
                }
                due = rest;
            }
        }
    }

    /// The logins of `due` this replica may drop now: those it claims (or
    /// still holds a claim on) that are still held. Another replica's
    /// claim keeps it off a login for [`CLAIM_FOR`]; a login released
    /// meanwhile was dropped by another.
    async fn claimed(&mut self, due: Vec<Due>) -> Vec<Due> {
        let now = Timestamp::now();
        let mut mine = Vec::with_capacity(due.len());
        for d in due {
            let id = &d.login.lease_id;
            if self.claims.get(id).is_some_and(|until| *until > now) {
                mine.push(d);
                continue;
            }
            match claim(self.store.as_ref(), "drop", id, now).await {
                Ok(true) => {
                    self.claims.insert(id.clone(), now.plus(CLAIM_FOR));
                    mine.push(d);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "database logins: cannot claim a drop");
                    break;
                }
            }
        }
        mine
    }

    /// Disables `batch` together, at once, then hands it to a removal of
    /// its own ([`remove`]), which reports back to [`finish`](Self::finish):
    /// the next revocation is disabled while this one is removed.
    async fn drop_batch(&mut self, engine: &Arc<dyn Engine>, batch: Vec<Due>) {
        let users: Vec<String> = batch.iter().map(|d| d.login.user.clone()).collect();
        let disabled: Vec<Removed> = match engine.disable(&users).await {
            Ok(()) => batch.into_iter().map(|d| (d, Removal::Done)).collect(),
            Err(e) if e.is_unavailable() || batch.len() == 1 => batch
                .into_iter()
                .map(|d| (d, Removal::Failed(e.clone())))
                .collect(),
            // One of them was refused: one at a time, so the rest go on
            // (until the database cannot be reached).
            Err(_) => {
                let mut each = Vec::with_capacity(batch.len());
                let mut unreachable: Option<EngineError> = None;
                for d in batch {
                    let r = match &unreachable {
                        Some(e) => Err(e.clone()),
                        None => engine.disable(std::slice::from_ref(&d.login.user)).await,
                    };
                    if let Err(e) = &r
                        && e.is_unavailable()
                    {
                        unreachable = Some(e.clone());
                    }
                    each.push((d, r.map_or_else(Removal::Failed, |()| Removal::Done)));
                }
                each
            }
        };
        crate::failpoint::hit("after_login_disabled");
        let (ok, failed): (Vec<Removed>, Vec<Removed>) = disabled
            .into_iter()
            .partition(|(_, r)| matches!(r, Removal::Done));
        self.failed(failed).await;
        if ok.is_empty() {
            return;
        }
        let due: Vec<Due> = ok.into_iter().map(|(d, _)| d).collect();
        self.removing
            .extend(due.iter().map(|d| d.login.lease_id.clone()));
        let one_at_a_time = self
            .removals
            .entry(engine.name().to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(1)))
            .clone();
        tokio::spawn(remove(
            engine.clone(),
            self.store.clone(),
            one_at_a_time,
            due,
            self.removed_tx.clone(),
        ));
    }

    /// Records and releases what a removal dropped, counts what failed.
    async fn finish(&mut self, done: Vec<Removed>) {
        let mut failures = Vec::new();
        for (d, r) in done {
            self.removing.remove(&d.login.lease_id);
            match r {
                Removal::Done => {
                    // The database answered: it is not down.
                    self.backoff.remove(&d.login.database);
                    self.dropped(d).await;
                }
                Removal::Skipped => {}
                Removal::Failed(_) => failures.push((d, r)),
            }
        }
        self.failed(failures).await;
    }

    /// Records `d` dropped and releases it.
    async fn dropped(&mut self, d: Due) {
        if let Err(e) = self.audit.record(self.record(&d)).await {
            // Kept held: dropped again (a no-op) and recorded then.
            tracing::error!(error = %e, "database login drop not recorded; retried");
            return;
        }
        self.active_until.remove(&d.login.lease_id);
        self.held.remove(&d.login.lease_id);
        self.refused.remove(&d.login.lease_id);
        if let Err(e) = self.store.release_login(&d.login.lease_id).await {
            tracing::warn!(error = %e, "database logins: release failed; retried");
            return;
        }
        self.claims.remove(&d.login.lease_id);
    }

    /// The `database_login_dropped` record of `d`.
    fn record(&self, d: &Due) -> AuditRecord {
        let mut record = AuditRecord::new(Event::DatabaseLoginDropped, &self.broker)
            .lease(&d.login.lease_id)
            .reason(&d.reason);
        record.audience = Some(d.login.database.clone());
        record.login = Some(d.login.user.clone());
        if let Some(l) = &d.lease {
            record = record.task_id(&l.task_id);
            record.agent = Some(l.agent.to_string());
        }
        record
    }

    /// Counts `failures` and backs off: the database, for one that could
    /// not be reached; each login, for one it refused to end. The first of
    /// each run is recorded.
    async fn failed(&mut self, failures: Vec<Removed>) {
        self.metrics
            .login_drop_failures
            .inc_by(u64::try_from(failures.len()).unwrap_or(u64::MAX));
        let mut unreachable_seen = HashSet::new();
        for (d, r) in failures {
            let Removal::Failed(e) = r else { continue };
            let unreachable = e.is_unavailable();
            let slot = if unreachable {
                // One backoff, and one record, per database and batch.
                if !unreachable_seen.insert(d.login.database.clone()) {
                    continue;
                }
                self.backoff
                    .entry(d.login.database.clone())
                    .or_insert((0, Instant::now()))
            } else {
                self.refused
                    .entry(d.login.lease_id.clone())
                    .or_insert((0, Instant::now()))
            };
            let failures_before = slot.0;
            let wait = Duration::from_secs(1u64 << failures_before.min(5)).min(MAX_BACKOFF);
            *slot = (failures_before + 1, Instant::now() + wait);
            tracing::warn!(
                database = %d.login.database,
                user = %d.login.user,
                unreachable,
                error = %e,
                retry_in_s = wait.as_secs(),
                "database login not dropped yet"
            );
            if failures_before == 0 {
                let mut record = self.record(&d);
                record.event = Event::DatabaseLoginDropFailed;
                record.reason = Some(e.to_string());
                if let Err(e) = self.audit.record(record).await {
                    tracing::error!(error = %e, "drop failure not recorded in the audit trail");
                }
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
                // One replica drops (and records) each orphan.
                let now = Timestamp::now();
                let key = format!("login-orphan:{}:{user}", engine.name());
                match self.store.first_use(&key, now.plus(CLAIM_FOR), now).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "sweep: cannot claim an orphan");
                        break;
                    }
                }
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

/// Claims `step` (`drop`, `remove`) of the login of `lease` for this
/// replica until [`CLAIM_FOR`] from `now`: `true` if no other replica
/// holds that claim and the login is still held (one released meanwhile
/// was dropped by another).
async fn claim(
    store: &dyn LeaseStore,
    step: &str,
    lease: &LeaseId,
    now: Timestamp,
) -> Result<bool, crate::store::StoreError> {
    let key = format!("login-{step}:{lease}");
    if store.first_use(&key, now.plus(CLAIM_FOR), now).await? {
        store.is_held(lease).await
    } else {
        Ok(false)
    }
}

/// Whether a backoff (failures, until) allows a try now.
fn ready_at(backoff: Option<&(u32, Instant)>) -> bool {
    backoff.is_none_or(|(_, at)| *at <= Instant::now())
}

/// Removes the disabled logins `due`, one batch per database at a time
/// (`one_at_a_time`): claims each removal in the store (a login another
/// replica claimed or already released is skipped), waits until the
/// claimed logins' sessions have ended, removes each (a few at once) and
/// confirms it gone; reports every outcome to `done`.
async fn remove(
    engine: Arc<dyn Engine>,
    store: Arc<dyn LeaseStore>,
    one_at_a_time: Arc<Semaphore>,
    due: Vec<Due>,
    done: mpsc::UnboundedSender<Vec<Removed>>,
) {
    let Ok(_turn) = one_at_a_time.acquire_owned().await else {
        return;
    };
    let mut mine = Vec::with_capacity(due.len());
    let mut outcomes = Vec::with_capacity(due.len());
    for d in due {
        match claim(
            store.as_ref(),
            "remove",
            &d.login.lease_id,
            Timestamp::now(),
        )
        .await
        {
            Ok(true) => mine.push(d),
            Ok(false) => outcomes.push((d, Removal::Skipped)),
            Err(e) => {
                tracing::warn!(error = %e, "database logins: cannot claim a removal");
                outcomes.push((d, Removal::Skipped));
            }
        }
    }
    if mine.is_empty() {
        let _ = done.send(outcomes);
        return;
    }
    let users: Vec<String> = mine.iter().map(|d| d.login.user.clone()).collect();
    match engine.ended(&users).await {
        Ok(()) => {
            let removed: Vec<Removed> = futures_util::stream::iter(mine.into_iter().map(|d| {
                let engine = engine.clone();
                async move {
                    let r = match remove_confirmed(engine.as_ref(), &d.login.user).await {
                        Ok(()) => Removal::Done,
                        Err(e) => Removal::Failed(e),
                    };
                    (d, r)
                }
            }))
            .buffer_unordered(REMOVALS_IN_FLIGHT)
            .collect()
            .await;
            outcomes.extend(removed);
        }
        Err(e) => outcomes.extend(mine.into_iter().map(|d| (d, Removal::Failed(e.clone())))),
    }
    let _ = done.send(outcomes);
}

/// Removes `user` and confirms it gone.
async fn remove_confirmed(engine: &dyn Engine, user: &str) -> Result<(), EngineError> {
    engine.remove(user).await?;
    if engine.exists(user).await? {
        return Err(EngineError::Refused {
            database: engine.name().to_owned(),
            step: "confirm",
            detail: "the login still exists after it was dropped".into(),
        });
    }
    Ok(())
}
