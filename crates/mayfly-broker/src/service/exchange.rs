//! Token exchange (RFC 8693): a service that received a token of a task
//! (the subject token) asks for a token to call the next service. The new
//! token is a lease of the same task, inside its envelope, decided by
//! policy as `exchange_token` (the service as principal, the next service
//! as resource, the subject agent and the subject token's audience in the
//! context), issued through the same pipeline as every credential, and
//! names the service as the current actor (`act`, one more hop each
//! time). It dies with its task, and with its service when an operator
//! revokes or locks that service.
//!
//! Only the subject token's recipient may exchange it: the caller must be
//! one of the `[[resource_servers]]` that receive tokens for the subject
//! token's audience. A token that leaked to another agent or service is
//! refused (and the attempt recorded) before policy is asked; policy sees
//! the matching resource server's name.

use mayfly_core::{
    AccessTokenClaims, Action, ActorClaim, ApprovalRequest, Audience, Lease, LeaseDetail, LeaseId,
    Scopes, SpiffeId, Task, TaskId, Timestamp, scope_string,
};

use super::pipeline::{Kind, Lifetime};
use super::{ExchangeRequest, Issuance, Issued, IssuedToken, TokenSigner};
use crate::audit::{AuditRecord, Event};
use crate::config::{Lifetimes, ResourceServer};
use crate::error::BrokerError;
use crate::identity::Caller;
use crate::issuer::AccessToken;

/// An exchange, with the subject token checked.
struct Exchange<'a> {
    req: &'a ExchangeRequest,
    /// The subject token's claims, verified.
    subject: AccessTokenClaims,
    /// Its lease, active.
    subject_lease: Lease,
    /// Its audience: what the exchanging service is to the task.
    subject_audience: Audience,
    /// The resource server of that audience the caller is one of.
    resource_server: String,
    /// The new token's scopes.
    scopes: Scopes,
}

impl Kind for Exchange<'_> {
    type Credential = AccessToken;
    const ISSUED: Event = Event::TokenExchanged;
    const DENIED: Event = Event::ExchangeDenied;

    fn owner<'a>(&'a self, _caller: &'a Caller) -> &'a SpiffeId {
        &self.subject_lease.agent
    }

    /// A service's hop waits for no operator: policy allows it or not.
    fn approval_request(&self) -> Option<ApprovalRequest> {
        None
    }

    /// The broker's token lifetimes, and never past the subject token.
    fn lifetime(&self, lifetimes: &Lifetimes) -> Lifetime {
        let left = Timestamp::now().until(self.subject_lease.expires_at);
        Lifetime {
            asked: None,
            default: lifetimes.token_default_ttl,
            max: lifetimes.token_max_ttl.min(left),
        }
    }

    fn check(&self, task: &Task) -> Option<BrokerError> {
        let excess = task.envelope.excess(&self.req.audience, &self.scopes)?;
        Some(BrokerError::OutsideEnvelope(excess))
    }

    fn action(&self) -> Action<'_> {
        Action::ExchangeToken {
            subject: &self.subject_lease.agent,
            subject_audience: &self.subject_audience,
            resource_server: &self.resource_server,
            audience: &self.req.audience,
            scopes: &self.scopes,
            binding: &self.req.binding,
        }
    }

    const STATUS_LISTED: bool = true;

    fn detail(&self, caller: &Caller, status_idx: Option<u64>) -> LeaseDetail {
        LeaseDetail::ExchangedToken {
            audience: self.req.audience.clone(),
            binding: self.req.binding.clone(),
            actor: caller.id.clone(),
            subject_audience: self.subject_audience.clone(),
            status_idx,
        }
    }

    fn scopes(&self) -> Scopes {
        self.scopes.clone()
    }

    fn describe(&self, record: AuditRecord, _lease: Option<&Lease>) -> AuditRecord {
        let mut record = record.credential(Some(self.req.audience.as_str()), &self.scopes);
        record.subject_lease_id = Some(self.subject_lease.id.to_string());
        record
    }

    async fn mint(
        &self,
        tokens: &TokenSigner,
        _task: &Task,
        lease: &Lease,
    ) -> Result<AccessToken, BrokerError> {
        // Still the work of the same agent (`sub`), in the hands of the
        // service (the lease's holder), one more actor on the chain.
        tokens.sign_lease(
            lease,
            self.subject.sub.clone(),
            Some(ActorClaim {
                sub: lease.holder().to_string(),
                act: self.subject.act.clone().map(Box::new),
            }),
        )
    }

    fn summary(&self, lease: &Lease) -> String {
        format!(
            "token for {} [{}] exchanged by {} for lease {}",
            self.req.audience,
            scope_string(&self.scopes),
            lease.holder(),
            self.subject_lease.id
        )
    }
}

impl Issuance {
    /// RFC 8693 token exchange by `caller`, a service that received
    /// `req.subject_token`: a token of the same task for `req.audience`.
    /// The subject token must be this broker's, issued for an audience of
    /// a resource server `caller` is one of (else `NotRecipient`, recorded),
    /// unexpired, and its lease active (else `InvalidSubjectToken`).
    pub async fn exchange_token(
        &self,
        caller: &Caller,
        req: ExchangeRequest,
    ) -> Result<Issued<IssuedToken>, BrokerError> {
        let invalid = |why: &str| BrokerError::InvalidSubjectToken(why.to_owned());
        let subject = self
            .tokens
            .verify(&req.subject_token)
            .ok_or_else(|| invalid("is not a token this broker issued"))?;
        // Only the token's recipient may exchange it: checked before
        // anything else is learnt about the token, and recorded, since a
        // token presented by anyone else has leaked.
        let Some(resource_server) =
            ResourceServer::find(&self.shared.resource_servers, &caller.id, &subject.aud)
        else {
            let refused = BrokerError::NotRecipient {
                caller: caller.id.clone(),
                audience: subject.aud.clone(),
            };
            let mut record = caller
                .record(Event::ExchangeDenied)
                .credential(Some(req.audience.as_str()), &Scopes::default());
            if let Ok(task) = TaskId::new(&subject.task_id) {
                record = record.task_id(&task);
            }
            if let Ok(lease) = LeaseId::new(&subject.jti) {
                record.subject_lease_id = Some(lease.to_string());
            }
            return Err(self.shared.record_denial(refused, record).await);
        };
        let resource_server = resource_server.name.clone();
        let now = Timestamp::now();
        if subject.exp <= now.as_secs() || subject.nbf > now.as_secs() {
            return Err(invalid("has expired or is not valid yet"));
        }
        let jti = LeaseId::new(&subject.jti).map_err(|_| invalid("has a malformed jti"))?;
        let lease = self
            .shared
            .store
            .get_lease(&jti)
            .await?
            .filter(|l| {
                l.task_id.as_str() == subject.task_id
                    && l.holder().as_str() == subject.client_id
                    && l.is_active_at(now)
            })
            .ok_or_else(|| invalid("is revoked or expired"))?;
        let Some(subject_audience) = lease.audience().cloned() else {
            return Err(invalid("is not an access token"));
        };
        // The store checks the task owner's lock; the service's is checked
        // here, before anything is decided.
        self.shared.refuse_locked(&caller.id, now).await?;
        let task_id = lease.task_id.clone();
        let kind = Exchange {
            scopes: req.scopes.clone().unwrap_or_else(|| lease.scopes.clone()),
            req: &req,
            subject,
            subject_lease: lease,
            subject_audience,
            resource_server,
        };
        self.issue(caller, &kind, &task_id, None).await
    }
}
