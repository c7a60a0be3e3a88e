//! The credential kinds: tokens and certificates, as the pipeline
//! (`pipeline.rs`) issues them, and introspection of tokens.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mayfly_core::{
    Action, ApprovalRequest, Binding, Lease, LeaseDetail, LeaseId, Pattern, RevocationReason,
    Scopes, SpiffeId, Task, Timestamp, scope_string,
};

use super::pipeline::{Kind, Lifetime};
use super::{
    CertificateRequest, Issuance, Issued, IssuedCertificate, IssuedToken, TaskCertificate,
    TokenRequest, TokenSigner,
};
use crate::audit::{AuditRecord, Event};
use crate::cause::Cause;
use crate::config::Lifetimes;
use crate::error::BrokerError;
use crate::identity::Caller;
use crate::issuer::{AccessToken, IssuingCa};
use crate::store::{RevokeRequest, StoreError};

impl Kind for TokenRequest {
    type Credential = AccessToken;
    const ISSUED: Event = Event::TokenIssued;
    const DENIED: Event = Event::TokenDenied;

    fn approval_request(&self) -> Option<ApprovalRequest> {
        Some(ApprovalRequest::token(
            self.audience.clone(),
            self.scopes.clone(),
            self.ttl,
            &self.binding,
        ))
    }

    fn lifetime(&self, lifetimes: &Lifetimes) -> Lifetime {
        Lifetime {
            asked: self.ttl,
            default: lifetimes.token_default_ttl,
            max: lifetimes.token_max_ttl,
        }
    }

    fn check(&self, task: &Task) -> Option<BrokerError> {
        let excess = task.envelope.excess(&self.audience, &self.scopes)?;
        Some(BrokerError::OutsideEnvelope(excess))
    }

    fn action(&self) -> Action<'_> {
        Action::IssueToken {
            audience: &self.audience,
            scopes: &self.scopes,
            binding: &self.binding,
        }
    }

    const STATUS_LISTED: bool = true;

    fn detail(&self, _caller: &Caller, status_idx: Option<u64>) -> LeaseDetail {
        LeaseDetail::Token {
            audience: self.audience.clone(),
            binding: self.binding.clone(),
            status_idx,
        }
    }

    fn scopes(&self) -> Scopes {
        self.scopes.clone()
    }

    fn describe(&self, record: AuditRecord, _lease: Option<&Lease>) -> AuditRecord {
        record.credential(Some(self.audience.as_str()), &self.scopes)
    }

    async fn mint(
        &self,
        tokens: &TokenSigner,
        task: &Task,
        lease: &Lease,
    ) -> Result<AccessToken, BrokerError> {
        tokens.sign_lease(lease, task.subject().to_string(), task.actors())
    }

    fn summary(&self, lease: &Lease) -> String {
        format!(
            "token for {} [{}]{}",
            self.audience,
            scope_string(&self.scopes),
            match lease.binding() {
                Some(Binding::Certificate { .. }) => ", bound to the certificate",
                Some(Binding::Dpop { .. }) => ", DPoP-bound",
                Some(Binding::Bearer) | None => "",
            }
        )
    }
}

/// A certificate request with what its minting needs: the CA (the one
/// signing when the request came, recorded on the lease) and the leaf's
/// SPIFFE ID.
struct Certificate<'a> {
    req: &'a CertificateRequest,
    ca: Arc<IssuingCa>,
    /// `<agent>/task/<task_id>`.
    spiffe_id: SpiffeId,
}

impl Kind for Certificate<'_> {
    type Credential = TaskCertificate;
    const ISSUED: Event = Event::CertificateIssued;
    const DENIED: Event = Event::CertificateDenied;

    fn approval_request(&self) -> Option<ApprovalRequest> {
        let key_sha256 = URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            self.req.key.spki(),
        ));
        Some(ApprovalRequest::Certificate {
            key_sha256,
            ttl_seconds: self.req.ttl.map_or(0, |d| d.as_secs()),
        })
    }

    fn lifetime(&self, lifetimes: &Lifetimes) -> Lifetime {
        Lifetime {
            asked: self.req.ttl,
            default: lifetimes.cert_default_ttl,
            max: lifetimes.cert_max_ttl,
        }
    }

    fn action(&self) -> Action<'_> {
        Action::SignCertificate
    }

    fn detail(&self, _caller: &Caller, _status_idx: Option<u64>) -> LeaseDetail {
        LeaseDetail::Certificate {
            serial: crate::issuer::random_serial().1,
            issuing_ca: Some(self.ca.id().to_owned()),
        }
    }

    fn describe(&self, mut record: AuditRecord, lease: Option<&Lease>) -> AuditRecord {
        record.serial = lease.and_then(Lease::serial).map(str::to_owned);
        record
    }

    async fn mint(
        &self,
        _tokens: &TokenSigner,
        _task: &Task,
        lease: &Lease,
    ) -> Result<TaskCertificate, BrokerError> {
        let serial = lease.serial().ok_or_else(|| {
            BrokerError::Internal(Cause::msg("a certificate lease without its serial"))
        })?;
        let serial = crate::issuer::serial_from_hex(serial)
            .map_err(|e| BrokerError::Internal(Cause::of(e)))?;
        let certificate_pem = self
            .ca
            .sign_svid(
                &self.req.key,
                &self.spiffe_id,
                lease.issued_at.minus(crate::issuer::BACKDATE),
                lease.expires_at,
                serial,
            )
            .map_err(|e| BrokerError::Internal(Cause::of(e)))?;
        Ok(TaskCertificate {
            certificate_pem,
            chain_pem: self.ca.chain_pem().to_owned(),
            spiffe_id: self.spiffe_id.clone(),
        })
    }

    fn summary(&self, lease: &Lease) -> String {
        format!(
            "certificate {} serial {} ({} key)",
            self.spiffe_id,
            lease.serial().unwrap_or_default(),
            self.req.key.kind()
        )
    }
}

impl Issuance {
    /// Issues a token under one of the caller's active tasks, or opens an
    /// approval when policy requires one.
    pub async fn issue_token(
        &self,
        caller: &Caller,
        req: TokenRequest,
    ) -> Result<Issued<IssuedToken>, BrokerError> {
        self.issue(caller, &req, &req.task_id, req.approval_id.as_ref())
            .await
    }

    /// Signs a task-bound X.509-SVID over the CSR's key under one of the
    /// caller's active tasks, or opens an approval when policy requires one.
    pub async fn sign_certificate(
        &self,
        caller: &Caller,
        req: CertificateRequest,
    ) -> Result<Issued<IssuedCertificate>, BrokerError> {
        let ca = self.ca.as_ref().map(|ring| ring.current()).ok_or_else(|| {
            BrokerError::Unsupported(
                "this broker signs no certificates: it has no issuing CA ([ca] in its configuration)".into(),
            )
        })?;
        let spiffe_id = caller
            .id
            .join(&["task", req.task_id.as_str()])
            .map_err(|e| BrokerError::Invalid(format!("task SPIFFE ID: {e}")))?;
        let kind = Certificate {
            req: &req,
            ca,
            spiffe_id,
        };
        self.issue(caller, &kind, &req.task_id, req.approval_id.as_ref())
            .await
    }

    /// RFC 7009 revocation of one of the caller's own tokens: its lease is
    /// revoked (`token_revoked`) if still active. A token that does not
    /// verify with this broker's keys and issuer, or whose lease is gone or
    /// already ended, changes nothing; a token issued to another client is
    /// refused. Returns the lease ids revoked.
    pub async fn revoke_own_token(
        &self,
        caller: &Caller,
        token: &str,
    ) -> Result<Vec<LeaseId>, BrokerError> {
        let Some(claims) = self.tokens.verify(token) else {
            return Ok(Vec::new());
        };
        let Ok(jti) = LeaseId::new(&claims.jti) else {
            return Ok(Vec::new());
        };
        if claims.client_id != caller.id.as_str() {
            return Err(BrokerError::NotTokenClient(caller.id.clone()));
        }
        let now = Timestamp::now();
        let Some(lease) = self.shared.store.get_lease(&jti).await? else {
            return Ok(Vec::new());
        };
        // A token (issued or exchanged) held by the caller, still live.
        if lease.audience().is_none() || lease.holder() != &caller.id || !lease.is_active_at(now) {
            return Ok(Vec::new());
        }
        let reason = RevocationReason::TokenRevoked;
        let req = RevokeRequest {
            reason,
            child_reason: reason,
            by: caller.id.clone(),
            note: None,
            at: now,
        };
        let revoked = match self.shared.store.revoke_lease(&jti, &req).await {
            Err(StoreError::LeaseNotFound) => Vec::new(),
            other => other?,
        };
        if !revoked.is_empty() {
            self.shared.revoked.notify_one();
            self.shared
                .audit_anyway(
                    caller
                        .record(Event::LeaseRevoked)
                        .task_id(&lease.task_id)
                        .lease(&jti)
                        .reason(reason.as_str())
                        .revoked(&revoked),
                )
                .await;
        }
        Ok(revoked)
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
        let Some(claims) = self.tokens.verify(token) else {
            return Ok(None);
        };
        if !audiences.iter().any(|p| p.matches(&claims.aud)) || !self.is_live(&claims).await? {
            return Ok(None);
        }
        let mut out =
            serde_json::to_value(&claims).map_err(|e| BrokerError::Internal(Cause::of(e)))?;
        out["active"] = serde_json::Value::Bool(true);
        out["token_type"] = "Bearer".into();
        Ok(Some(out))
    }

    /// Whether `claims` (of a token this broker signed) are live now: in
    /// their time, and their lease active and exactly what they say. The
    /// lease, not the token, says what was issued: a token whose audience,
    /// scopes, expiry or binding differ from its lease's is not one this
    /// broker handed out as it reads.
    async fn is_live(&self, claims: &mayfly_core::AccessTokenClaims) -> Result<bool, BrokerError> {
        let now = Timestamp::now();
        if now.as_secs() >= claims.exp || claims.nbf > now.as_secs() {
            return Ok(false);
        }
        let Ok(jti) = LeaseId::new(&claims.jti) else {
            return Ok(false);
        };
        let lease = self.shared.store.get_lease(&jti).await?;
        let scope = claims.scope.as_deref().unwrap_or("");
        Ok(lease.is_some_and(|l| {
            let Some(audience) = l.audience() else {
                return false;
            };
            l.is_active_at(now)
                && l.task_id.as_str() == claims.task_id
                && l.holder().as_str() == claims.client_id
                && audience.as_str() == claims.aud
                && scope_string(&l.scopes) == scope
                && l.expires_at.as_secs() == claims.exp
                && l.binding().and_then(Binding::confirmation) == claims.cnf
        }))
    }

    /// Who presents `token` to a broker endpoint of its own (Shared
    /// Signals): the token's holder (`client_id`), if it is a live token
    /// of this broker for `audience`, bearer or bound to the certificate
    /// the request came with (`peer_x5t`, its `x5t#S256`). A DPoP-bound
    /// token is refused here.
    pub async fn bearer_holder(
        &self,
        token: &str,
        audience: &str,
        peer_x5t: Option<&str>,
    ) -> Result<Option<SpiffeId>, BrokerError> {
        let Some(claims) = self.tokens.verify(token) else {
            return Ok(None);
        };
        let bound_ok = match &claims.cnf {
            None => true,
            Some(c) => c.jkt.is_none() && c.x5t_s256.as_deref() == peer_x5t,
        };
        if claims.aud != audience || !bound_ok || !self.is_live(&claims).await? {
            return Ok(None);
        }
        Ok(SpiffeId::new(&claims.client_id).ok())
    }
}
