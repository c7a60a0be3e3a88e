//! The broker's request handling, independent of gRPC: authorization, TTLs,
//! envelopes, ownership, signing, and the store calls that make each step
//! atomic. The gRPC services are thin wrappers over [`Service`].

use std::sync::Arc;
use std::time::Duration;

use mayfly_core::{
    AccessTokenClaims, Audience, Confirmation, Decision, Envelope, Intent, IssueTokenRequest,
    Lease, LeaseId, LeaseKind, LeaseStatus, Pattern, Policy, Revocation, RevocationReason, Scopes,
    SignCertificateRequest, SpiffeId, SpiffeIdPattern, StartTaskRequest, Task, TaskContext, TaskId,
    TaskRecord, Timestamp, scope_string,
};

use tokio::sync::Notify;

use crate::error::BrokerError;
use crate::identity::Caller;
use crate::issuer::{AccessToken, CsrKey, IssuingCa, JwtSigner};
use crate::store::{
    LeaseFilter, LeaseStore, Page, PageRequest, RevokeRequest, StoreError, TaskFilter,
};

/// A TTL beyond this is a client bug, not a request to clamp.
pub const ABSURD_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// Longest operator note on a revocation.
pub const MAX_NOTE_BYTES: usize = 512;

/// Lifetimes from configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Token TTL when the request asks for 0.
    pub token_default_ttl: Duration,
    /// No token lives longer.
    pub token_max_ttl: Duration,
    /// Task TTL when the request asks for 0.
    pub task_default_ttl: Duration,
    /// No task lives longer.
    pub task_max_ttl: Duration,
    /// Certificate TTL when the request asks for 0.
    pub cert_default_ttl: Duration,
    /// No certificate lives longer.
    pub cert_max_ttl: Duration,
}

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

/// Parses an operator's note.
pub fn parse_note(note: &str) -> Result<Option<String>, BrokerError> {
    if note.is_empty() {
        return Ok(None);
    }
    if note.len() > MAX_NOTE_BYTES || note.chars().any(char::is_control) {
        return Err(BrokerError::Invalid(format!(
            "note must be at most {MAX_NOTE_BYTES} bytes without control characters"
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

/// A validated `IssueToken`.
#[derive(Debug)]
pub struct TokenRequest {
    /// Under which task.
    pub task_id: TaskId,
    /// For which API.
    pub audience: Audience,
    /// With which scopes.
    pub scopes: Scopes,
    /// Requested lifetime; `None` for the default.
    pub ttl: Option<Duration>,
    /// Bind to the caller's client certificate.
    pub bind_to_client_cert: bool,
}

/// A validated `SignCertificate`.
#[derive(Debug)]
pub struct CertificateRequest {
    /// Under which task.
    pub task_id: TaskId,
    /// The CSR's public key, checked.
    pub key: CsrKey,
    /// Requested lifetime; `None` for the default.
    pub ttl: Option<Duration>,
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

/// An issued token and its lease.
#[derive(Debug)]
pub struct IssuedToken {
    /// The compact JWS.
    pub token: AccessToken,
    /// Its lease, as recorded.
    pub lease: Lease,
}

/// Who may introspect tokens of which audiences (`[[introspection]]`).
#[derive(Debug, Clone)]
pub struct IntrospectionGrant {
    /// Resource servers' SPIFFE ID patterns.
    pub clients: Vec<SpiffeIdPattern>,
    /// Audiences whose tokens they may inspect.
    pub audiences: Vec<Pattern>,
}

/// The broker's request handling: what it needs, given at start.
#[derive(Debug)]
pub struct Service {
    /// Where leases and tasks live.
    pub store: Arc<dyn LeaseStore>,
    /// Decides every request.
    pub policy: Arc<dyn Policy>,
    /// Signs tokens.
    pub signer: Arc<JwtSigner>,
    /// `iss` of every token.
    pub issuer: String,
    /// Lifetimes.
    pub limits: Limits,
    /// Who may call the Admin API.
    pub operators: Vec<SpiffeIdPattern>,
    /// Signs task certificates, when configured.
    pub ca: Option<Arc<IssuingCa>>,
    /// Woken after every revocation, so the feed picks it up at once.
    pub revoked: Arc<Notify>,
    /// Who may introspect tokens.
    pub introspection: Vec<IntrospectionGrant>,
}

impl Service {
    /// The store, for readiness checks and the reaper.
    pub fn store(&self) -> &Arc<dyn LeaseStore> {
        &self.store
    }

    /// Refuses callers outside the operator set.
    pub fn require_operator(&self, caller: &Caller) -> Result<(), BrokerError> {
        if self.operators.iter().any(|p| p.matches(&caller.id)) {
            Ok(())
        } else {
            Err(BrokerError::NotOperator(caller.id.clone()))
        }
    }

    /// Opens a task for `caller`.
    pub async fn start_task(
        &self,
        caller: &Caller,
        req: NewTask,
    ) -> Result<TaskRecord, BrokerError> {
        let decision = self.policy.decide_start_task(&StartTaskRequest {
            agent: &caller.id,
            intent: &req.intent,
            context: &req.context,
            envelope: &req.envelope,
        });
        let policy_id = permit(decision)?.0;
        let now = Timestamp::now().floor_secs();
        let ttl = req
            .ttl
            .unwrap_or(self.limits.task_default_ttl)
            .min(self.limits.task_max_ttl);
        let task = Task {
            id: TaskId::generate(),
            agent: caller.id.clone(),
            intent: req.intent,
            context: req.context,
            envelope: req.envelope,
            created_at: now,
            expires_at: now.plus(Duration::from_secs(ttl.as_secs())),
        };
        self.store.start_task(&task).await?;
        tracing::info!(
            target: "mayfly::decision",
            event = "task_started",
            agent = %caller.id,
            task_id = %task.id,
            policy = %policy_id,
            expires_at = task.expires_at.as_secs(),
        );
        Ok(TaskRecord {
            task,
            status: LeaseStatus::Active,
        })
    }

    /// The caller's task; another agent's task is "not found".
    pub async fn own_task(&self, caller: &Caller, id: &TaskId) -> Result<TaskRecord, BrokerError> {
        match self.store.get_task(id).await? {
            Some(r) if r.task.agent == caller.id => Ok(r),
            _ => Err(BrokerError::TaskNotFound(id.clone())),
        }
    }

    /// Issues a token under one of the caller's active tasks.
    pub async fn issue_token(
        &self,
        caller: &Caller,
        req: TokenRequest,
    ) -> Result<IssuedToken, BrokerError> {
        let now = Timestamp::now();
        let record = self.active_task(caller, &req.task_id, now).await?;
        let task = &record.task;
        if let Some(excess) = task.envelope.excess(&req.audience, &req.scopes) {
            return Err(BrokerError::OutsideEnvelope(excess));
        }
        let decision = self.policy.decide_issue_token(&IssueTokenRequest {
            agent: &caller.id,
            task,
            audience: &req.audience,
            scopes: &req.scopes,
        });
        let (policy_id, policy_max) = permit(decision)?;
        let issued_at = now.floor_secs();
        let expires_at = expiry(
            now,
            req.ttl,
            [
                Some(self.limits.token_default_ttl),
                Some(self.limits.token_max_ttl),
                policy_max,
            ],
            task,
        )?;

        let lease = Lease {
            id: LeaseId::generate(),
            kind: LeaseKind::Jwt,
            agent: caller.id.clone(),
            task_id: task.id.clone(),
            audience: Some(req.audience.clone()),
            scopes: req.scopes.clone(),
            issued_at,
            expires_at,
            status: LeaseStatus::Active,
            cert_thumbprint: req
                .bind_to_client_cert
                .then(|| caller.cert_thumbprint.clone()),
            serial: None,
        };
        let claims = AccessTokenClaims {
            iss: self.issuer.clone(),
            sub: caller.id.to_string(),
            aud: req.audience.to_string(),
            exp: expires_at.as_secs(),
            iat: issued_at.as_secs(),
            nbf: issued_at.as_secs(),
            jti: lease.id.to_string(),
            client_id: caller.id.to_string(),
            scope: (!req.scopes.is_empty()).then(|| scope_string(&req.scopes)),
            task_id: task.id.to_string(),
            cnf: lease
                .cert_thumbprint
                .clone()
                .map(|x5t_s256| Confirmation { x5t_s256 }),
            act: None,
        };
        let token = self
            .signer
            .sign(&claims)
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        // The token leaves only after its lease is durably recorded, under a
        // task that is still active at that moment.
        self.store
            .issue(&lease, now)
            .await
            .map_err(|e| BrokerError::from_store(e, &task.id))?;
        tracing::info!(
            target: "mayfly::decision",
            event = "token_issued",
            agent = %caller.id,
            task_id = %task.id,
            lease_id = %lease.id,
            audience = %req.audience,
            scope = %scope_string(&req.scopes),
            policy = %policy_id,
            expires_at = expires_at.as_secs(),
            bound = req.bind_to_client_cert,
        );
        Ok(IssuedToken { token, lease })
    }

    /// Signs a task-bound X.509-SVID over the CSR's key, under one of the
    /// caller's active tasks.
    pub async fn sign_certificate(
        &self,
        caller: &Caller,
        req: CertificateRequest,
    ) -> Result<IssuedCertificate, BrokerError> {
        let ca = self.ca.as_ref().ok_or_else(|| {
            BrokerError::Unsupported(
                "this broker signs no certificates: it has no issuing CA ([ca] in its configuration)"
                    .into(),
            )
        })?;
        let now = Timestamp::now();
        let record = self.active_task(caller, &req.task_id, now).await?;
        let task = &record.task;
        let decision = self
            .policy
            .decide_sign_certificate(&SignCertificateRequest {
                agent: &caller.id,
                task,
            });
        let (policy_id, policy_max) = permit(decision)?;
        let issued_at = now.floor_secs();
        let expires_at = expiry(
            now,
            req.ttl,
            [
                Some(self.limits.cert_default_ttl),
                Some(self.limits.cert_max_ttl),
                policy_max,
            ],
            task,
        )?;
        let spiffe_id = caller
            .id
            .join(&["task", task.id.as_str()])
            .map_err(|e| BrokerError::Invalid(format!("task SPIFFE ID: {e}")))?;
        let (serial, serial_hex) = crate::issuer::x509::random_serial();
        let certificate_pem = ca
            .sign_svid(
                &req.key,
                &spiffe_id,
                issued_at.minus(crate::issuer::x509::BACKDATE),
                expires_at,
                serial,
            )
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        let lease = Lease {
            id: LeaseId::generate(),
            kind: LeaseKind::X509,
            agent: caller.id.clone(),
            task_id: task.id.clone(),
            audience: None,
            scopes: Default::default(),
            issued_at,
            expires_at,
            status: LeaseStatus::Active,
            cert_thumbprint: None,
            serial: Some(serial_hex),
        };
        // Returned only once its lease is durable, as for tokens.
        self.store
            .issue(&lease, now)
            .await
            .map_err(|e| BrokerError::from_store(e, &task.id))?;
        tracing::info!(
            target: "mayfly::decision",
            event = "certificate_issued",
            agent = %caller.id,
            task_id = %task.id,
            lease_id = %lease.id,
            serial = lease.serial.as_deref().unwrap_or_default(),
            key = req.key.kind(),
            policy = %policy_id,
            expires_at = expires_at.as_secs(),
        );
        Ok(IssuedCertificate {
            certificate_pem,
            chain_pem: ca.chain_pem().to_owned(),
            lease,
            spiffe_id,
        })
    }

    /// RFC 7662 introspection for a resource server: the token's claims if
    /// it is one of ours, unexpired, its lease active, and its audience one
    /// the caller may see; `None` (`"active": false`) otherwise. Fails only
    /// when the caller may not introspect at all, or the store is down.
    pub async fn introspect(
        &self,
        caller: &Caller,
        token: &str,
    ) -> Result<Option<serde_json::Value>, BrokerError> {
        let audiences: Vec<&Pattern> = self
            .introspection
            .iter()
            .filter(|g| g.clients.iter().any(|p| p.matches(&caller.id)))
            .flat_map(|g| &g.audiences)
            .collect();
        if audiences.is_empty() {
            return Err(BrokerError::NotIntrospector(caller.id.clone()));
        }
        let Some(claims) = self.signer.verify(token) else {
            return Ok(None);
        };
        let now = Timestamp::now();
        let live = claims.iss == self.issuer
            && now.as_secs() < claims.exp
            && claims.nbf <= now.as_secs()
            && audiences.iter().any(|p| p.matches(&claims.aud));
        let Some(jti) = live.then(|| LeaseId::new(&claims.jti).ok()).flatten() else {
            return Ok(None);
        };
        let lease = self.store.get_lease(&jti).await?;
        let active = lease.is_some_and(|l| {
            l.kind == LeaseKind::Jwt
                && l.is_active_at(now)
                && l.task_id.as_str() == claims.task_id
                && l.agent.as_str() == claims.sub
        });
        if !active {
            return Ok(None);
        }
        let mut out =
            serde_json::to_value(&claims).map_err(|e| BrokerError::Internal(e.to_string()))?;
        out["active"] = serde_json::Value::Bool(true);
        out["token_type"] = "Bearer".into();
        Ok(Some(out))
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
            mayfly_core::TaskState::Active => Ok(record),
            state => Err(BrokerError::TaskNotActive {
                id: id.clone(),
                state,
            }),
        }
    }

    /// Completes one of the caller's tasks, revoking everything under it.
    pub async fn complete_task(
        &self,
        caller: &Caller,
        id: &TaskId,
    ) -> Result<(Vec<LeaseId>, TaskRecord), BrokerError> {
        let mut record = self.own_task(caller, id).await?;
        let req = RevokeRequest {
            reason: RevocationReason::TaskCompleted,
            child_reason: RevocationReason::TaskCompleted,
            by: caller.id.clone(),
            note: None,
            at: Timestamp::now(),
        };
        let revoked = self
            .store
            .end_task(id, &req)
            .await
            .map_err(|e| BrokerError::from_store(e, id))?;
        self.revoked.notify_one();
        tracing::info!(
            target: "mayfly::decision",
            event = "task_completed",
            agent = %caller.id,
            task_id = %id,
            revoked = revoked.len(),
        );
        record.status = LeaseStatus::Revoked(Revocation {
            reason: req.reason,
            at: req.at,
            by: req.by,
            note: None,
        });
        Ok((revoked, record))
    }

    /// Lists leases (operators).
    pub async fn list_leases(
        &self,
        filter: &LeaseFilter,
        page: &PageRequest,
    ) -> Result<Page<Lease>, BrokerError> {
        Ok(self
            .store
            .list_leases(filter, page, Timestamp::now())
            .await?)
    }

    /// Lists tasks (operators).
    pub async fn list_tasks(
        &self,
        filter: &TaskFilter,
        page: &PageRequest,
    ) -> Result<Page<TaskRecord>, BrokerError> {
        Ok(self
            .store
            .list_tasks(filter, page, Timestamp::now())
            .await?)
    }

    /// One lease (operators).
    pub async fn get_lease(&self, id: &LeaseId) -> Result<Lease, BrokerError> {
        self.store
            .get_lease(id)
            .await?
            .ok_or_else(|| BrokerError::LeaseNotFound(id.clone()))
    }

    /// Any task (operators).
    pub async fn get_task(&self, id: &TaskId) -> Result<TaskRecord, BrokerError> {
        self.store
            .get_task(id)
            .await?
            .ok_or_else(|| BrokerError::TaskNotFound(id.clone()))
    }

    /// Revokes one lease (operators). Revoking a task's lease revokes the task.
    pub async fn revoke_lease(
        &self,
        operator: &Caller,
        id: &LeaseId,
        note: Option<String>,
    ) -> Result<Vec<LeaseId>, BrokerError> {
        let req = self.operator_request(
            operator,
            RevocationReason::Operator,
            RevocationReason::TaskRevoked,
            note,
        );
        let revoked = match self.store.revoke_lease(id, &req).await {
            Err(StoreError::LeaseNotFound) => return Err(BrokerError::LeaseNotFound(id.clone())),
            other => other?,
        };
        if revoked.is_empty() {
            let lease = self.get_lease(id).await?;
            return Err(BrokerError::LeaseNotActive {
                id: id.clone(),
                state: lease.state_at(req.at),
            });
        }
        self.log_revocation("lease_revoked", operator, id.as_str(), &revoked);
        Ok(revoked)
    }

    /// Revokes a task and everything under it (operators).
    pub async fn revoke_task(
        &self,
        operator: &Caller,
        id: &TaskId,
        note: Option<String>,
    ) -> Result<Vec<LeaseId>, BrokerError> {
        let req = self.operator_request(
            operator,
            RevocationReason::Operator,
            RevocationReason::TaskRevoked,
            note,
        );
        let revoked = self
            .store
            .end_task(id, &req)
            .await
            .map_err(|e| BrokerError::from_store(e, id))?;
        self.log_revocation("task_revoked", operator, id.as_str(), &revoked);
        Ok(revoked)
    }

    /// Revokes every live task and lease of `agent` (operators).
    pub async fn revoke_agent(
        &self,
        operator: &Caller,
        agent: &SpiffeId,
        note: Option<String>,
    ) -> Result<Vec<LeaseId>, BrokerError> {
        let req = self.operator_request(
            operator,
            RevocationReason::AgentRevoked,
            RevocationReason::AgentRevoked,
            note,
        );
        let revoked = self.store.revoke_agent(agent, &req).await?;
        self.log_revocation("agent_revoked", operator, agent.as_str(), &revoked);
        Ok(revoked)
    }

    fn operator_request(
        &self,
        operator: &Caller,
        reason: RevocationReason,
        child_reason: RevocationReason,
        note: Option<String>,
    ) -> RevokeRequest {
        RevokeRequest {
            reason,
            child_reason,
            by: operator.id.clone(),
            note,
            at: Timestamp::now(),
        }
    }

    fn log_revocation(&self, event: &str, operator: &Caller, target: &str, revoked: &[LeaseId]) {
        self.revoked.notify_one();
        tracing::info!(
            target: "mayfly::decision",
            event,
            operator = %operator.id,
            target,
            revoked = revoked.len(),
        );
    }
}

/// A credential's expiry: the requested TTL (or the first cap, the default),
/// capped by every other limit and by the task's expiry, on whole seconds
/// from `now`.
fn expiry(
    now: Timestamp,
    requested: Option<Duration>,
    [default, broker_max, policy_max]: [Option<Duration>; 3],
    task: &Task,
) -> Result<Timestamp, BrokerError> {
    let ttl = [broker_max, policy_max]
        .into_iter()
        .flatten()
        .fold(requested.or(default).unwrap_or_default(), Duration::min);
    let expires_at = now
        .floor_secs()
        .plus(Duration::from_secs(ttl.as_secs()))
        .min(task.expires_at);
    if expires_at <= now {
        return Err(BrokerError::TaskNotActive {
            id: task.id.clone(),
            state: mayfly_core::TaskState::Expired,
        });
    }
    Ok(expires_at)
}

/// The permit's policy id and TTL cap, or the deny as an error.
fn permit(decision: Decision) -> Result<(String, Option<Duration>), BrokerError> {
    match decision {
        Decision::Permit { policy_id, max_ttl } => Ok((policy_id, max_ttl)),
        Decision::Deny { policy_id, reason } => Err(BrokerError::Denied { policy_id, reason }),
        other => Err(BrokerError::Internal(format!(
            "unsupported policy decision {other:?}"
        ))),
    }
}
