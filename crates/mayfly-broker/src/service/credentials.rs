//! Issuing credentials: tokens and certificates, with approvals when the
//! deciding policy asks for them, and introspection of tokens.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mayfly_core::{
    AccessTokenClaims, Approval, ApprovalId, ApprovalRequest, ApprovalState, ApprovalStatus,
    Confirmation, Decision, IssueTokenRequest, Lease, LeaseId, LeaseKind, LeaseStatus, Pattern,
    RevocationReason, SignCertificateRequest, Task, TaskId, Timestamp, scope_string,
};

use super::{
    CertificateRequest, Issued, IssuedCertificate, IssuedToken, Permit, Service, TokenRequest,
    asked, expiry,
};
use crate::audit::{AuditRecord, Event, RecordError};
use crate::error::BrokerError;
use crate::identity::Caller;
use crate::store::{RevokeRequest, StoreError};

/// How often a decision is made again when the task's context changes
/// while a credential is being issued.
const ATTEMPTS: usize = 3;

/// Whether `decision`, made on a cached task, must be made again on a
/// fresh read before it is acted on: a refusal (the task's context may
/// have changed to allow it) and an approval to open (the task may have
/// ended) are answered on the task as the store has it now.
fn needs_fresh_task(decision: &Decision) -> bool {
    !matches!(
        decision,
        Decision::Permit {
            approval_required: false,
            ..
        }
    )
}

/// What the approval step decided.
enum Gate {
    /// Go on; the credential records the approval it used, if any.
    Proceed(Option<ApprovalId>),
    /// Stop: an approval is now pending.
    Pending(Box<Approval>),
}

/// Why a credential was not recorded.
enum NotRecorded {
    /// The store refused its lease, or could not be reached.
    Store(StoreError),
    /// Anything else, as the caller's answer.
    Broker(BrokerError),
}

impl Service {
    /// Records `lease` (decided at `now`) and its audit `record`: in one
    /// atomic step when the trail lives in the store, else the lease and
    /// then the record (revoking the lease if the record fails). Either
    /// way the credential may leave only once this returns `Ok`.
    async fn record_issued(
        &self,
        lease: &Lease,
        now: Timestamp,
        record: AuditRecord,
    ) -> Result<(), NotRecorded> {
        if self.audit.records_leases() {
            return match self
                .audit
                .record_with_lease(record, lease.clone(), now)
                .await
            {
                Ok(()) => Ok(()),
                Err(RecordError::Lease(e)) => Err(NotRecorded::Store(e)),
                Err(RecordError::Audit(e)) => Err(NotRecorded::Broker(e.into())),
            };
        }
        self.store
            .issue(lease, now)
            .await
            .map_err(NotRecorded::Store)?;
        self.record_credential(lease, record)
            .await
            .map_err(NotRecorded::Broker)
    }

    /// After a credential was not recorded: `Ok` to decide again (the
    /// task's context changed and attempts are left, counted in
    /// `attempt`), else the answer for the caller.
    fn decide_again(
        &self,
        e: NotRecorded,
        task: &TaskId,
        attempt: &mut usize,
    ) -> Result<(), BrokerError> {
        match e {
            NotRecorded::Store(e) => {
                self.tasks.forget(task);
                match e {
                    StoreError::TaskChanged if *attempt < ATTEMPTS => {
                        *attempt += 1;
                        Ok(())
                    }
                    e => Err(BrokerError::from_store(e, task)),
                }
            }
            NotRecorded::Broker(e) => Err(e),
        }
    }

    /// Records a credential just recorded in the store; if that fails, the
    /// lease is revoked again and the request fails, so no credential
    /// leaves without its audit record.
    async fn record_credential(
        &self,
        lease: &Lease,
        record: AuditRecord,
    ) -> Result<(), BrokerError> {
        if let Err(e) = self.audit(record).await {
            let req = RevokeRequest {
                reason: RevocationReason::Operator,
                child_reason: RevocationReason::Operator,
                by: self.broker_id.clone(),
                note: Some("audit trail unavailable".into()),
                at: Timestamp::now(),
            };
            if let Err(revoke) = self.store.revoke_lease(&lease.id, &req).await {
                tracing::error!(lease_id = %lease.id, error = %revoke, "unrecorded lease not revoked");
            }
            return Err(e);
        }
        Ok(())
    }

    /// The error for presenting an approval an operator refused, with who
    /// refused it and why.
    async fn denied_approval(&self, id: &ApprovalId) -> BrokerError {
        match self.store.get_approval(id).await {
            Ok(Some(Approval {
                status: ApprovalStatus::Denied { by, reason, .. },
                ..
            })) => BrokerError::ApprovalDenied {
                id: id.clone(),
                by,
                reason,
            },
            Ok(_) => BrokerError::ApprovalUnusable {
                id: id.clone(),
                state: ApprovalState::Denied,
            },
            Err(e) => BrokerError::from_approval(e, id),
        }
    }

    /// Consumes `approval_id` for exactly `request`, or opens a pending
    /// approval when the permit needs one and none was given.
    async fn approval_gate(
        &self,
        caller: &Caller,
        task: &Task,
        permit: &Permit,
        request: ApprovalRequest,
        approval_id: Option<&ApprovalId>,
        now: Timestamp,
    ) -> Result<Gate, BrokerError> {
        match approval_id {
            Some(id) => {
                match self
                    .store
                    .consume_approval(id, &caller.id, &task.id, &request, now)
                    .await
                {
                    Ok(_) => Ok(Gate::Proceed(Some(id.clone()))),
                    Err(StoreError::ApprovalState(ApprovalState::Denied)) => {
                        Err(self.denied_approval(id).await)
                    }
                    Err(e) => Err(BrokerError::from_approval(e, id)),
                }
            }
            None if permit.approval_required => {
                self.refuse_locked(&caller.id, now).await?;
                let approval = Approval {
                    id: ApprovalId::generate(),
                    agent: caller.id.clone(),
                    task_id: task.id.clone(),
                    request,
                    policy_id: permit.policy_id.clone(),
                    created_at: now,
                    expires_at: now.plus(self.limits.approval_ttl),
                    status: ApprovalStatus::Pending,
                };
                self.store.create_approval(&approval).await?;
                let mut record = AuditRecord::new(Event::ApprovalRequested, &caller.id)
                    .task(task)
                    .decided("pending", Some(&permit.policy_id))
                    .expires(approval.expires_at);
                record.approval_id = Some(approval.id.to_string());
                if let ApprovalRequest::Token {
                    audience, scopes, ..
                } = &approval.request
                {
                    record = record.credential(Some(audience.as_str()), scopes);
                }
                self.audit_anyway(record).await;
                tracing::info!(
                    target: "mayfly::decision",
                    event = "approval_requested",
                    agent = %caller.id,
                    task_id = %task.id,
                    approval_id = %approval.id,
                    policy = %permit.policy_id,
                );
                Ok(Gate::Pending(Box::new(approval)))
            }
            None => Ok(Gate::Proceed(None)),
        }
    }

    /// Issues a token under one of the caller's active tasks, or opens an
    /// approval when policy requires one.
    pub async fn issue_token(
        &self,
        caller: &Caller,
        req: TokenRequest,
    ) -> Result<Issued<IssuedToken>, BrokerError> {
        let issued = self.mint_token(caller, req).await;
        self.explain_lock(&caller.id, issued).await
    }

    async fn mint_token(
        &self,
        caller: &Caller,
        req: TokenRequest,
    ) -> Result<Issued<IssuedToken>, BrokerError> {
        self.rate_limit(caller)?;
        let request = ApprovalRequest::Token {
            audience: req.audience.clone(),
            scopes: req.scopes.clone(),
            ttl_seconds: req.ttl_seconds,
            bind: req.bind_to_client_cert,
        };
        let ttl_asked = asked(
            super::requested_ttl("ttl_seconds", req.ttl_seconds)?,
            self.limits.token_default_ttl,
            self.limits.token_max_ttl,
        );
        // The approval consumed for this request, once it is: a decision
        // made again (the context changed) is gated again unless one was.
        let mut used_approval: Option<ApprovalId> = None;
        // A cached task is enough to issue on (the store checks it again);
        // an approval is consumed or opened only on a fresh read.
        let mut cached = req.approval_id.is_none();
        let mut attempt = 1;
        loop {
            let now = Timestamp::now();
            let (record, from_cache) = self
                .credential_task(caller, &req.task_id, now, cached)
                .await?;
            let task = &record.task;
            let denied = || {
                AuditRecord::new(Event::TokenDenied, &caller.id)
                    .task(task)
                    .credential(Some(req.audience.as_str()), &req.scopes)
            };
            if let Some(excess) = task.envelope.excess(&req.audience, &req.scopes) {
                // The envelope never changes, but the task may have ended.
                if from_cache {
                    cached = false;
                    continue;
                }
                let e = BrokerError::OutsideEnvelope(excess);
                return Err(self.record_denial(e, denied()).await);
            }
            let decision = self.policy.decide_issue_token(&IssueTokenRequest {
                agent: &caller.id,
                task,
                audience: &req.audience,
                scopes: &req.scopes,
                ttl: ttl_asked,
                now,
            });
            if from_cache && needs_fresh_task(&decision) {
                cached = false;
                continue;
            }
            let permit = self.permit_or_record(decision, denied).await?;
            if used_approval.is_none() {
                match self
                    .approval_gate(
                        caller,
                        task,
                        &permit,
                        request.clone(),
                        req.approval_id.as_ref(),
                        now,
                    )
                    .await?
                {
                    Gate::Pending(a) => return Ok(Issued::Pending(a)),
                    Gate::Proceed(a) => used_approval = a,
                }
            }
            let approval = used_approval.clone();
            let issued_at = now.floor_secs();
            let expires_at = expiry(now, ttl_asked, permit.max_ttl, task)?;
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
                task_revision: task.revision,
                approval: approval.clone(),
            };
            let claims = AccessTokenClaims {
                iss: self.issuer.clone(),
                sub: task.subject().to_string(),
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
                act: task.actors(),
            };
            let token = self
                .signer
                .sign(&claims)
                .map_err(|e| BrokerError::Internal(e.to_string()))?;
            let mut record = AuditRecord::new(Event::TokenIssued, &caller.id)
                .task(task)
                .lease(&lease.id)
                .credential(Some(req.audience.as_str()), &req.scopes)
                .decided("permit", Some(&permit.policy_id))
                .expires(expires_at);
            record.approval_id = approval.as_ref().map(ToString::to_string);
            // The token leaves only after its lease and its record are
            // durable, under a task still active and unchanged at that moment.
            if let Err(e) = self.record_issued(&lease, now, record).await {
                // The context changed: decide again on a fresh read.
                match self.decide_again(e, &task.id, &mut attempt) {
                    Ok(()) => {}
                    Err(locked @ BrokerError::AgentLocked(_)) => {
                        return Err(self.record_denial(locked, denied()).await);
                    }
                    Err(e) => return Err(e),
                }
                cached = false;
                continue;
            }
            // One per credential: debug, like expiry; the audit trail has
            // every one.
            tracing::debug!(
                target: "mayfly::decision",
                event = "token_issued",
                agent = %caller.id,
                task_id = %task.id,
                lease_id = %lease.id,
                audience = %req.audience,
                scope = %scope_string(&req.scopes),
                policy = %permit.policy_id,
                approval = approval.as_ref().map(|a| a.to_string()).unwrap_or_default(),
                expires_at = expires_at.as_secs(),
                bound = req.bind_to_client_cert,
            );
            return Ok(Issued::Credential(IssuedToken { token, lease }));
        }
    }

    /// Signs a task-bound X.509-SVID over the CSR's key under one of the
    /// caller's active tasks, or opens an approval when policy requires one.
    pub async fn sign_certificate(
        &self,
        caller: &Caller,
        req: CertificateRequest,
    ) -> Result<Issued<IssuedCertificate>, BrokerError> {
        let issued = self.mint_certificate(caller, req).await;
        self.explain_lock(&caller.id, issued).await
    }

    async fn mint_certificate(
        &self,
        caller: &Caller,
        req: CertificateRequest,
    ) -> Result<Issued<IssuedCertificate>, BrokerError> {
        let ca = self.ca.clone().ok_or_else(|| {
            BrokerError::Unsupported(
                "this broker signs no certificates: it has no issuing CA ([ca] in its configuration)".into(),
            )
        })?;
        self.rate_limit(caller)?;
        let key_sha256 =
            URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, req.key.spki()));
        let request = ApprovalRequest::Certificate {
            key_sha256,
            ttl_seconds: req.ttl_seconds,
        };
        let ttl_asked = asked(
            super::requested_ttl("ttl_seconds", req.ttl_seconds)?,
            self.limits.cert_default_ttl,
            self.limits.cert_max_ttl,
        );
        let spiffe_id = caller
            .id
            .join(&["task", req.task_id.as_str()])
            .map_err(|e| BrokerError::Invalid(format!("task SPIFFE ID: {e}")))?;
        let mut used_approval: Option<ApprovalId> = None;
        // As for tokens: issue on a cached task, refuse or gate on a fresh one.
        let mut cached = req.approval_id.is_none();
        let mut attempt = 1;
        loop {
            let now = Timestamp::now();
            let (record, from_cache) = self
                .credential_task(caller, &req.task_id, now, cached)
                .await?;
            let task = &record.task;
            let decision = self
                .policy
                .decide_sign_certificate(&SignCertificateRequest {
                    agent: &caller.id,
                    task,
                    ttl: ttl_asked,
                    now,
                });
            if from_cache && needs_fresh_task(&decision) {
                cached = false;
                continue;
            }
            let denied = || AuditRecord::new(Event::CertificateDenied, &caller.id).task(task);
            let permit = self.permit_or_record(decision, denied).await?;
            if used_approval.is_none() {
                match self
                    .approval_gate(
                        caller,
                        task,
                        &permit,
                        request.clone(),
                        req.approval_id.as_ref(),
                        now,
                    )
                    .await?
                {
                    Gate::Pending(a) => return Ok(Issued::Pending(a)),
                    Gate::Proceed(a) => used_approval = a,
                }
            }
            let issued_at = now.floor_secs();
            let expires_at = expiry(now, ttl_asked, permit.max_ttl, task)?;
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
                task_revision: task.revision,
                approval: used_approval.clone(),
            };
            let mut record = AuditRecord::new(Event::CertificateIssued, &caller.id)
                .task(task)
                .lease(&lease.id)
                .decided("permit", Some(&permit.policy_id))
                .expires(expires_at);
            record.serial = lease.serial.clone();
            record.approval_id = lease.approval.as_ref().map(ToString::to_string);
            // Returned only once its lease and record are durable, as for tokens.
            if let Err(e) = self.record_issued(&lease, now, record).await {
                // The context changed: decide again on a fresh read.
                match self.decide_again(e, &task.id, &mut attempt) {
                    Ok(()) => {}
                    Err(locked @ BrokerError::AgentLocked(_)) => {
                        return Err(self.record_denial(locked, denied()).await);
                    }
                    Err(e) => return Err(e),
                }
                cached = false;
                continue;
            }
            // One per credential: debug, like expiry; the audit trail has
            // every one.
            tracing::debug!(
                target: "mayfly::decision",
                event = "certificate_issued",
                agent = %caller.id,
                task_id = %task.id,
                lease_id = %lease.id,
                serial = lease.serial.as_deref().unwrap_or_default(),
                key = req.key.kind(),
                policy = %permit.policy_id,
                expires_at = expires_at.as_secs(),
            );
            return Ok(Issued::Credential(IssuedCertificate {
                certificate_pem,
                chain_pem: ca.chain_pem().to_owned(),
                lease,
                spiffe_id,
            }));
        }
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
        // The lease, not the token, says what was issued: a token whose
        // audience, scopes, expiry or binding differ from its lease's is
        // not one this broker handed out as it reads.
        let scope = claims.scope.as_deref().unwrap_or("");
        let active = lease.is_some_and(|l| {
            l.kind == LeaseKind::Jwt
                && l.is_active_at(now)
                && l.task_id.as_str() == claims.task_id
                && l.agent.as_str() == claims.client_id
                && l.audience
                    .as_ref()
                    .is_some_and(|a| a.as_str() == claims.aud)
                && scope_string(&l.scopes) == scope
                && l.expires_at.as_secs() == claims.exp
                && l.cert_thumbprint.as_deref() == claims.cnf.as_ref().map(|c| c.x5t_s256.as_str())
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
}
