//! `mayfly.v1.Broker`: the agents' API.

use std::sync::Arc;

use mayfly_core::{
    ApprovalId, Audience, Binding, ContextChange, Envelope, Intent, SpiffeId, TaskContext, TaskId,
    Timestamp, parse_scopes,
};
use mayfly_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{approval_to_proto, caller, field, task_to_proto, timestamp};
use crate::error::BrokerError;
use crate::identity::Caller;
use crate::issuer::parse_csr;
use crate::service::{
    CertificateRequest, DatabaseLoginRequest, Issued, NewDelegation, NewTask, Service,
    TokenRequest, bind_to_certificate, requested_ttl,
};

/// An optional approval id field.
fn optional_approval(s: &str) -> Result<Option<ApprovalId>, BrokerError> {
    if s.is_empty() {
        Ok(None)
    } else {
        field("approval_id", s, ApprovalId::new).map(Some)
    }
}

/// What `IssueToken` asks the token to be bound to: the call's client
/// certificate, a DPoP key given as its public JWK, or nothing.
fn binding(caller: &Caller, to_client_cert: bool, dpop_jwk: &str) -> Result<Binding, BrokerError> {
    match (to_client_cert, dpop_jwk.is_empty()) {
        (false, true) => Ok(Binding::Bearer),
        (true, true) => bind_to_certificate(caller),
        (true, false) => Err(BrokerError::Invalid(
            "bind_to_client_cert and dpop_jwk: a token is bound to one key, choose one".into(),
        )),
        (false, false) => {
            if dpop_jwk.len() > mayfly_core::dpop::MAX_PROOF_BYTES {
                return Err(BrokerError::Invalid("dpop_jwk is too long".into()));
            }
            let jwk: serde_json::Value = serde_json::from_str(dpop_jwk)
                .map_err(|e| BrokerError::Invalid(format!("dpop_jwk is not JSON: {e}")))?;
            let jkt = mayfly_core::dpop::jwk_thumbprint(&jwk)
                .map_err(|e| BrokerError::Invalid(format!("dpop_jwk: {e}")))?;
            Ok(Binding::Dpop { jkt })
        }
    }
}

/// The Broker service over [`Service`].
#[derive(Debug, Clone)]
pub struct BrokerApi {
    svc: Arc<Service>,
}

impl BrokerApi {
    /// Wraps the service.
    pub fn new(svc: Arc<Service>) -> Self {
        Self { svc }
    }
}

impl TryFrom<pb::StartTaskRequest> for NewTask {
    type Error = BrokerError;
    fn try_from(r: pb::StartTaskRequest) -> Result<Self, BrokerError> {
        let envelope = Envelope::new(&r.audiences, &r.scopes).map_err(BrokerError::invalid)?;
        Ok(Self {
            intent: Intent::new(&r.intent).map_err(BrokerError::invalid)?,
            context: TaskContext::new(&r.context).map_err(BrokerError::invalid)?,
            envelope,
            ttl: requested_ttl("ttl_seconds", r.ttl_seconds)?,
        })
    }
}

impl TryFrom<pb::DelegateTaskRequest> for NewDelegation {
    type Error = BrokerError;
    fn try_from(r: pb::DelegateTaskRequest) -> Result<Self, BrokerError> {
        let delegate = field("delegate_id", &r.delegate_id, SpiffeId::new)?;
        if delegate.is_task_bound() {
            return Err(BrokerError::Invalid(format!(
                "delegate_id: {delegate} is a task certificate's identity (it has a `task` \
                 segment), not an agent"
            )));
        }
        Ok(Self {
            parent: field("parent_task_id", &r.parent_task_id, TaskId::new)?,
            delegate,
            intent: Intent::new(&r.intent).map_err(BrokerError::invalid)?,
            envelope: Envelope::new(&r.audiences, &r.scopes).map_err(BrokerError::invalid)?,
            ttl: requested_ttl("ttl_seconds", r.ttl_seconds)?,
        })
    }
}

/// A validated `IssueToken` of `caller` (whose certificate a binding may
/// name).
fn token_request(r: pb::IssueTokenRequest, caller: &Caller) -> Result<TokenRequest, BrokerError> {
    Ok(TokenRequest {
        task_id: field("task_id", &r.task_id, TaskId::new)?,
        audience: field("audience", &r.audience, Audience::new)?,
        scopes: parse_scopes(&r.scopes).map_err(BrokerError::invalid)?,
        ttl: requested_ttl("ttl_seconds", r.ttl_seconds)?,
        binding: binding(caller, r.bind_to_client_cert, &r.dpop_jwk)?,
        approval_id: optional_approval(&r.approval_id)?,
    })
}

impl TryFrom<pb::SignCertificateRequest> for CertificateRequest {
    type Error = BrokerError;
    fn try_from(r: pb::SignCertificateRequest) -> Result<Self, BrokerError> {
        Ok(Self {
            task_id: field("task_id", &r.task_id, TaskId::new)?,
            key: parse_csr(&r.csr).map_err(BrokerError::invalid)?,
            ttl: requested_ttl("ttl_seconds", r.ttl_seconds)?,
            approval_id: optional_approval(&r.approval_id)?,
        })
    }
}

#[tonic::async_trait]
impl pb::broker_server::Broker for BrokerApi {
    async fn sign_certificate(
        &self,
        request: Request<pb::SignCertificateRequest>,
    ) -> Result<Response<pb::IssuedCertificate>, Status> {
        let caller = caller(&request)?;
        let req = CertificateRequest::try_from(request.into_inner())?;
        let issued = match self.svc.issuance().sign_certificate(&caller, req).await? {
            Issued::Credential(c) => c,
            Issued::Pending(a) => {
                return Ok(Response::new(pb::IssuedCertificate {
                    approval: Some(approval_to_proto(&a, None, Timestamp::now())),
                    ..Default::default()
                }));
            }
        };
        let (cert, lease) = (issued.credential, issued.lease);
        Ok(Response::new(pb::IssuedCertificate {
            certificate_pem: cert.certificate_pem,
            chain_pem: cert.chain_pem,
            lease_id: lease.id.to_string(),
            serial: lease.serial().unwrap_or_default().to_owned(),
            expires_at: Some(timestamp(lease.expires_at)),
            spiffe_id: cert.spiffe_id.to_string(),
            approval: None,
        }))
    }

    async fn update_task_context(
        &self,
        request: Request<pb::UpdateTaskContextRequest>,
    ) -> Result<Response<pb::UpdateTaskContextResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let id = field("task_id", &r.task_id, TaskId::new)?;
        let change = ContextChange::new(&r.set, &r.remove).map_err(BrokerError::invalid)?;
        let (record, revoked) = self
            .svc
            .tasks()
            .update_task_context(&caller, &id, change)
            .await?;
        Ok(Response::new(pb::UpdateTaskContextResponse {
            task: Some(task_to_proto(&record, Timestamp::now())),
            revoked_leases: revoked.iter().map(|l| l.to_string()).collect(),
        }))
    }

    async fn wait_approval(
        &self,
        request: Request<pb::WaitApprovalRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let id = field("approval_id", &r.approval_id, ApprovalId::new)?;
        let wait = std::time::Duration::from_secs(u64::from(r.wait_seconds));
        let approval = self
            .svc
            .approvals()
            .wait_approval(&caller, &id, wait)
            .await?;
        Ok(Response::new(approval_to_proto(
            &approval,
            None,
            Timestamp::now(),
        )))
    }

    async fn issue_database_credential(
        &self,
        request: Request<pb::IssueDatabaseCredentialRequest>,
    ) -> Result<Response<pb::DatabaseCredential>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let req = DatabaseLoginRequest {
            task_id: field("task_id", &r.task_id, TaskId::new)?,
            database: field("database", &r.database, Audience::new)?,
            scopes: parse_scopes(&r.scopes).map_err(BrokerError::invalid)?,
            ttl: requested_ttl("ttl_seconds", r.ttl_seconds)?,
            approval_id: optional_approval(&r.approval_id)?,
        };
        let issued = match self
            .svc
            .issuance()
            .issue_database_login(&caller, req)
            .await?
        {
            Issued::Credential(c) => c,
            Issued::Pending(a) => {
                return Ok(Response::new(pb::DatabaseCredential {
                    approval: Some(approval_to_proto(&a, None, Timestamp::now())),
                    ..Default::default()
                }));
            }
        };
        let (login, lease) = (issued.credential, issued.lease);
        Ok(Response::new(pb::DatabaseCredential {
            lease_id: lease.id.to_string(),
            user: login.user.clone(),
            password: login.password.expose().to_owned(),
            dsn: login.dsn.expose().to_owned(),
            expires_at: Some(timestamp(lease.expires_at)),
            database: lease
                .database_login()
                .map(|(d, _)| d.to_string())
                .unwrap_or_default(),
            approval: None,
        }))
    }

    async fn delegate_task(
        &self,
        request: Request<pb::DelegateTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let caller = caller(&request)?;
        let req = NewDelegation::try_from(request.into_inner())?;
        let record = self.svc.tasks().delegate_task(&caller, req).await?;
        Ok(Response::new(task_to_proto(&record, Timestamp::now())))
    }

    async fn start_task(
        &self,
        request: Request<pb::StartTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let caller = caller(&request)?;
        let req = NewTask::try_from(request.into_inner())?;
        let record = self.svc.tasks().start_task(&caller, req).await?;
        Ok(Response::new(task_to_proto(&record, Timestamp::now())))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let caller = caller(&request)?;
        let id = field("task_id", &request.get_ref().task_id, TaskId::new)?;
        let record = self.svc.tasks().own_task(&caller, &id).await?;
        Ok(Response::new(task_to_proto(&record, Timestamp::now())))
    }

    async fn issue_token(
        &self,
        request: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssuedToken>, Status> {
        let caller = caller(&request)?;
        let req = token_request(request.into_inner(), &caller)?;
        let issued = match self.svc.issuance().issue_token(&caller, req).await? {
            Issued::Credential(t) => t,
            Issued::Pending(a) => {
                return Ok(Response::new(pb::IssuedToken {
                    approval: Some(approval_to_proto(&a, None, Timestamp::now())),
                    ..Default::default()
                }));
            }
        };
        let lease = &issued.lease;
        Ok(Response::new(pb::IssuedToken {
            token: issued.credential.into_string(),
            lease_id: lease.id.to_string(),
            expires_at: Some(timestamp(lease.expires_at)),
            token_type: lease.binding().map_or("Bearer", Binding::token_type).into(),
            scopes: lease.scopes.iter().map(|s| s.to_string()).collect(),
            audience: lease.audience().map(|a| a.to_string()).unwrap_or_default(),
            approval: None,
        }))
    }

    async fn complete_task(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let caller = caller(&request)?;
        let id = field("task_id", &request.get_ref().task_id, TaskId::new)?;
        let (revoked, record) = self.svc.tasks().complete_task(&caller, &id).await?;
        Ok(Response::new(pb::CompleteTaskResponse {
            revoked_leases: revoked.iter().map(|l| l.to_string()).collect(),
            task: Some(task_to_proto(&record, Timestamp::now())),
        }))
    }
}
