//! The broker's request handling, independent of gRPC: authorization, TTLs,
//! envelopes, ownership, approvals, signing, and the store calls that make
//! each step atomic. The gRPC services are thin wrappers over [`Service`].
//!
//! - `tasks.rs`: start, complete, context changes and re-evaluation.
//! - `pipeline.rs`: the one path every credential takes (decide, approve,
//!   mint, record, decide again).
//! - `credentials.rs`: the credential kinds (tokens, certificates), and
//!   introspection.
//! - `approvals.rs`: pending approvals, operator decisions, waiting.
//! - `admin.rs`: listing and revocation for operators.
//! - `task_cache.rs`: recent task reads, so an issue is one store call.

mod admin;
mod approvals;
mod credentials;
mod pipeline;
mod task_cache;
mod tasks;

pub use task_cache::TaskCache;

use std::sync::Arc;
use std::time::Duration;

use mayfly_core::{
    Approval, ApprovalId, Audience, Decision, Envelope, Intent, Lease, Policy, RevocationReason,
    Scopes, SpiffeId, SpiffeIdPattern, Task, TaskContext, TaskId, TaskRecord, TaskState, Timestamp,
};
use tokio::sync::Notify;

use crate::audit::AuditRecord;
use crate::config::{IntrospectionGrant, Lifetimes};
use crate::error::BrokerError;
use crate::identity::Caller;
use crate::issuer::{AccessToken, CsrKey, IssuingCa, JwtSigner};
use crate::ratelimit::RateLimiter;
use crate::recorder::Recorder;
use crate::store::{LeaseStore, RevokeRequest};

pub use mayfly_core::limits::{MAX_NOTE_BYTES, MAX_TTL as ABSURD_TTL};

/// Parses a requested TTL in seconds: 0 means "the default".
pub fn requested_ttl(field: &str, secs: u64) -> Result<Option<Duration>, BrokerError> {
    let d = Duration::from_secs(secs);
    if d > ABSURD_TTL {
        return Err(BrokerError::Invalid(format!(
            "{field} {secs} is absurd (more than a year); ask for what the work needs, or 0 for the default"
        )));
    }
    Ok((secs > 0).then_some(d))
}

/// Parses an operator's free text (`note`, `reason`), naming `field` in
/// the error.
pub fn parse_note(field: &str, note: &str) -> Result<Option<String>, BrokerError> {
    if note.is_empty() {
        return Ok(None);
    }
    if note.len() > MAX_NOTE_BYTES || note.chars().any(char::is_control) {
        return Err(BrokerError::Invalid(format!(
            "{field} must be at most {MAX_NOTE_BYTES} bytes without control characters"
        )));
    }
    Ok(Some(note.to_owned()))
}

/// A validated `StartTask`.
#[derive(Debug)]
pub struct NewTask {
    /// What the task is for.
    pub intent: Intent,
    /// Facts for policy.
    pub context: TaskContext,
    /// Audiences and scopes it may need.
    pub envelope: Envelope,
    /// Requested lifetime; `None` for the default.
    pub ttl: Option<Duration>,
}

/// A validated `DelegateTask`.
#[derive(Debug)]
pub struct NewDelegation {
    /// The caller's task to delegate from.
    pub parent: TaskId,
    /// The agent that will own the new task.
    pub delegate: SpiffeId,
    /// What the new task is for.
    pub intent: Intent,
    /// Its audiences and scopes: within the parent's.
    pub envelope: Envelope,
    /// Requested lifetime; `None` for the default.
    pub ttl: Option<Duration>,
}

/// A validated `IssueToken`.
#[derive(Debug)]
pub struct TokenRequest {
    /// Under which task.
    pub task_id: TaskId,
    /// For which API.
    pub audience: Audience,
    /// With which scopes.
    pub scopes: Scopes,
    /// The TTL field as sent (0 = default); approvals are bound to it.
    pub ttl_seconds: u64,
    /// Bind to the caller's client certificate.
    pub bind_to_client_cert: bool,
    /// Collects an approved request.
    pub approval_id: Option<ApprovalId>,
}

/// A validated `SignCertificate`.
#[derive(Debug)]
pub struct CertificateRequest {
    /// Under which task.
    pub task_id: TaskId,
    /// The CSR's public key, checked.
    pub key: CsrKey,
    /// The TTL field as sent (0 = default); approvals are bound to it.
    pub ttl_seconds: u64,
    /// Collects an approved request.
    pub approval_id: Option<ApprovalId>,
}

/// An issued token and its lease.
#[derive(Debug)]
pub struct IssuedToken {
    /// The compact JWS.
    pub token: AccessToken,
    /// Its lease, as recorded.
    pub lease: Lease,
}

/// A signed certificate and its lease.
#[derive(Debug)]
pub struct IssuedCertificate {
    /// The leaf, PEM.
    pub certificate_pem: String,
    /// The issuing CA and intermediates, PEM.
    pub chain_pem: String,
    /// Its lease (with the serial).
    pub lease: Lease,
    /// The leaf's SPIFFE ID: `<agent>/task/<task_id>`.
    pub spiffe_id: SpiffeId,
}

/// A credential, or the approval it waits for.
#[derive(Debug)]
pub enum Issued<T> {
    /// Issued.
    Credential(T),
    /// Policy requires an operator's approval first.
    Pending(Box<Approval>),
}

/// What policy allowed.
#[derive(Debug)]
struct Permit {
    /// The deciding policies.
    policy_id: String,
    /// The shortest cap among them.
    max_ttl: Option<Duration>,
    /// Whether an operator must approve.
    approval_required: bool,
}

/// The permit, or the deny as an error.
fn permit(decision: Decision) -> Result<Permit, BrokerError> {
    match decision {
        Decision::Permit {
            policy_id,
            max_ttl,
            approval_required,
        } => Ok(Permit {
            policy_id,
            max_ttl,
            approval_required,
        }),
        Decision::Deny { policy_id, reason } => Err(BrokerError::Denied { policy_id, reason }),
        other => Err(BrokerError::Internal(format!(
            "unsupported policy decision {other:?}"
        ))),
    }
}

/// The lifetime asked for: the request's, or the default, within the
/// broker's maximum.
fn asked(requested: Option<Duration>, default: Duration, max: Duration) -> Duration {
    requested.unwrap_or(default).min(max)
}

/// A credential's expiry: `ttl` capped by the policy and the task's expiry,
/// on whole seconds from `now`.
fn expiry(
    now: Timestamp,
    ttl: Duration,
    policy_max: Option<Duration>,
    task: &Task,
) -> Result<Timestamp, BrokerError> {
    let ttl = policy_max.map_or(ttl, |m| ttl.min(m));
    let expires_at = now
        .floor_secs()
        .plus(Duration::from_secs(ttl.as_secs()))
        .min(task.expires_at);
    if expires_at <= now {
        return Err(BrokerError::TaskNotActive {
            id: task.id.clone(),
            state: TaskState::Expired,
        });
    }
    Ok(expires_at)
}

/// What the broker issues credentials with.
#[derive(Debug)]
pub struct Issuance {
    /// Signs tokens.
    pub signer: Arc<JwtSigner>,
    /// `iss` of every token.
    pub issuer: String,
    /// Signs task certificates, when configured.
    pub ca: Option<Arc<IssuingCa>>,
    /// Lifetimes.
    pub limits: Lifetimes,
    /// Per-agent issuance limit.
    pub rate: RateLimiter,
    /// Who may introspect tokens.
    pub introspection: Vec<IntrospectionGrant>,
}

/// Who oversees the broker, and as whom it acts on its own.
#[derive(Debug)]
pub struct Admin {
    /// Who may call the Admin API.
    pub operators: Vec<SpiffeIdPattern>,
    /// The identity the broker revokes as, when it acts on its own
    /// (re-evaluation after a policy reload, undoing an unrecorded write).
    pub broker_id: SpiffeId,
}

/// The broker's request handling, built once at start from its parts:
/// what every request shares (the store, policy, the recorder, metrics),
/// what credentials are issued with, and who administers. The fields are
/// private; the service's own modules are the only ones that reach them.
#[derive(Debug)]
pub struct Service {
    /// Where leases and tasks live.
    store: Arc<dyn LeaseStore>,
    /// Decides every request (reloadable).
    policy: Arc<dyn Policy>,
    /// Where every decision is recorded.
    audit: Recorder,
    /// Counters and histograms for `/metrics`.
    metrics: Arc<crate::metrics::Metrics>,
    /// Woken after every revocation, so the feed picks it up at once.
    revoked: Arc<Notify>,
    /// Tasks as recently read, for issuing credentials.
    tasks: TaskCache,
    /// Keys, CA, lifetimes and limits of issuance.
    issuance: Issuance,
    /// Operators and the broker's own identity.
    admin: Admin,
}

impl Service {
    /// The service over `store`, deciding with `policy`, recording through
    /// `audit`, counting in `metrics` and waking `revoked` after every
    /// revocation.
    pub fn new(
        store: Arc<dyn LeaseStore>,
        policy: Arc<dyn Policy>,
        audit: Recorder,
        metrics: Arc<crate::metrics::Metrics>,
        revoked: Arc<Notify>,
        issuance: Issuance,
        admin: Admin,
    ) -> Self {
        Self {
            store,
            policy,
            audit,
            metrics,
            revoked,
            tasks: TaskCache::default(),
            issuance,
            admin,
        }
    }

    /// The recorder, for the reaper and audit reads.
    pub fn recorder(&self) -> &Recorder {
        &self.audit
    }

    /// The counters, for `/metrics`.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// The identity the broker acts as on its own.
    pub fn broker_id(&self) -> &SpiffeId {
        &self.admin.broker_id
    }
}

impl Service {
    /// The store, for readiness checks and the reaper.
    pub fn store(&self) -> &Arc<dyn LeaseStore> {
        &self.store
    }

    /// Refuses callers outside the operator set.
    pub fn require_operator(&self, caller: &Caller) -> Result<(), BrokerError> {
        if self.admin.operators.iter().any(|p| p.matches(&caller.id)) {
            Ok(())
        } else {
            Err(BrokerError::NotOperator(caller.id.clone()))
        }
    }

    /// The caller's task; another agent's task is "not found".
    pub async fn own_task(&self, caller: &Caller, id: &TaskId) -> Result<TaskRecord, BrokerError> {
        match self.store.get_task(id).await? {
            Some(r) if r.task.agent == caller.id => Ok(r),
            _ => Err(BrokerError::TaskNotFound(id.clone())),
        }
    }

    /// One of the caller's tasks, active at `now`.
    async fn active_task(
        &self,
        caller: &Caller,
        id: &TaskId,
        now: Timestamp,
    ) -> Result<TaskRecord, BrokerError> {
        let record = self.own_task(caller, id).await?;
        match record.state_at(now) {
            TaskState::Active => Ok(record),
            state => Err(BrokerError::TaskNotActive {
                id: id.clone(),
                state,
            }),
        }
    }

    /// The task a credential is requested under, active at `now`: from the
    /// cache when `cached` allows it (the second value says whether it
    /// came from there), else from the store (and then kept). A cached
    /// task may be behind the store; see [`TaskCache`] for why issuing on
    /// it is safe, and the callers for the answers that need a fresh read.
    async fn credential_task(
        &self,
        caller: &Caller,
        id: &TaskId,
        now: Timestamp,
        cached: bool,
    ) -> Result<(Arc<TaskRecord>, bool), BrokerError> {
        if cached
            && let Some(record) = self.tasks.get(id)
            && record.task.agent == caller.id
            && record.state_at(now) == TaskState::Active
        {
            return Ok((record, true));
        }
        let record = Arc::new(self.active_task(caller, id, now).await?);
        self.tasks.put(record.clone());
        Ok((record, false))
    }

    /// Records a decision that must be on record before the caller hears
    /// of it (an issued credential, a new task): failing to record fails
    /// the request.
    async fn audit(&self, record: AuditRecord) -> Result<(), BrokerError> {
        Ok(self.audit.record(record).await?)
    }

    /// Records a new task's decision, its task already written; if the
    /// trail cannot take it, the task is ended again and the request fails,
    /// so no unrecorded task is handed out. (A credential is recorded with
    /// its lease in one step instead: `Recorder::record_issued`.)
    async fn audit_or_end_task(
        &self,
        task: &TaskId,
        record: AuditRecord,
    ) -> Result<(), BrokerError> {
        let Err(e) = self.audit(record).await else {
            return Ok(());
        };
        let reason = RevocationReason::TaskRevoked;
        let req = RevokeRequest {
            reason,
            child_reason: reason,
            by: self.admin.broker_id.clone(),
            note: Some("audit trail unavailable".into()),
            at: Timestamp::now(),
        };
        if let Err(undo) = self.store.end_task(task, &req).await {
            tracing::error!(task_id = %task, error = %undo, "unrecorded task not ended");
        }
        Err(e)
    }

    /// Records a decision that stands whether or not it is recorded (a
    /// denial, a revocation): a failure is logged, not returned.
    async fn audit_anyway(&self, record: AuditRecord) {
        let event = record.event;
        if let Err(e) = self.audit.record(record).await {
            tracing::error!(%event, error = %e, "decision not recorded in the audit trail");
        }
    }

    /// `decision` as a permit; a denial is recorded (as `denied()` with the
    /// deciding policy and the reason) before it is returned.
    async fn permit_or_record(
        &self,
        decision: Decision,
        denied: impl FnOnce() -> AuditRecord,
    ) -> Result<Permit, BrokerError> {
        match permit(decision) {
            Ok(p) => Ok(p),
            Err(e) => Err(self.record_denial(e, denied()).await),
        }
    }

    /// Records `record` as the denial `e`, and returns `e`.
    async fn record_denial(&self, e: BrokerError, record: AuditRecord) -> BrokerError {
        let policy = match &e {
            BrokerError::Denied { policy_id, .. } => policy_id.clone(),
            _ => None,
        };
        let reason = match &e {
            BrokerError::Denied { reason, .. } => reason.clone(),
            other => other.to_string(),
        };
        self.audit_anyway(record.decided("deny", policy.as_deref()).reason(reason))
            .await;
        e
    }

    /// Fills in the lock behind an `AgentLocked` refusal of `agent`, so the
    /// caller learns who locked it, why, and until when; a task found
    /// revoked because its agent was locked is refused as locked too.
    async fn explain_lock<T>(
        &self,
        agent: &SpiffeId,
        result: Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        let lock = || async {
            let lock = self.store.agent_lock(agent, Timestamp::now()).await;
            lock.ok().flatten().map(Box::new)
        };
        match result {
            Err(BrokerError::AgentLocked(None)) => Err(BrokerError::AgentLocked(lock().await)),
            Err(
                e @ BrokerError::TaskNotActive {
                    state: TaskState::Revoked,
                    ..
                },
            ) => match lock().await {
                Some(l) => Err(BrokerError::AgentLocked(Some(l))),
                None => Err(e),
            },
            other => other,
        }
    }

    /// Refuses `agent` at once while a lock holds it (for steps that would
    /// leave state behind before the store's own check, such as opening an
    /// approval).
    async fn refuse_locked(&self, agent: &SpiffeId, now: Timestamp) -> Result<(), BrokerError> {
        match self.store.agent_lock(agent, now).await? {
            Some(lock) => Err(BrokerError::AgentLocked(Some(Box::new(lock)))),
            None => Ok(()),
        }
    }

    /// Takes one issuance from the caller's bucket.
    fn rate_limit(&self, caller: &Caller) -> Result<(), BrokerError> {
        self.issuance
            .rate
            .check(&caller.id)
            .map_err(|retry_after| BrokerError::RateLimited { retry_after })
    }
}
